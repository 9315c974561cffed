"""Damaged tensor files become visionpeft's own errors, naming the file and what to do."""

from __future__ import annotations

import argparse
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from visionpeft import checkpoints, tensorfiles
from visionpeft.errors import ConfigError, DataError, TrainingError

TINY_VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2}
TINY_CLIP = "visionpeft-test-errors-tiny-clip"


def _truncated_safetensors(path):
    save_file({"a": torch.zeros(64)}, path)
    path.write_bytes(path.read_bytes()[:-16])
    return path


def _pickled_with_an_object(path):
    torch.save({"state_dict": {"a": torch.zeros(2)}, "args": argparse.Namespace(lr=0.1)}, path)
    return path


@pytest.mark.parametrize("cut", [0.05, 0.5], ids=["near-the-start", "in-the-middle"])
def test_a_truncated_trainer_state_is_a_training_error(tmp_path, cut):
    path = tmp_path / checkpoints.STATE_FILE
    torch.save({"step": 3, "extra_tensors": {"w": torch.zeros(10_000)}}, path)
    path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    with pytest.raises(TrainingError, match=rf"resume: {re.escape(str(path))} is truncated or damaged .*; the "
                                            rf"checkpoint is damaged: delete {re.escape(str(tmp_path))} to resume "
                                            "from the one before it, or start the run in a new output_dir"):
        checkpoints.read_state(tmp_path)


def test_a_pickled_vit_checkpoint_is_refused_with_how_to_convert_it(tmp_path):
    pytest.importorskip("timm")
    from visionpeft.vit.models import build_vit

    path = _pickled_with_an_object(tmp_path / "vit.pth")
    with pytest.raises(ConfigError) as caught:
        build_vit("vit_tiny_patch16_224", 3, checkpoint=path, **TINY_VIT)
    message = str(caught.value)
    assert message.startswith(f"model.checkpoint: {path} is a pickled checkpoint with Python objects besides tensors "
                              "(it holds argparse.Namespace), which torch.load(weights_only=True) refuses")
    assert "only .safetensors files and weights-only torch files are loaded" in message
    assert f"torch.load('{path}', map_location='cpu', weights_only=False)" in message
    assert f"give {tmp_path / 'vit.safetensors'} instead" in message


def test_a_truncated_vit_checkpoint_names_the_file(tmp_path):
    pytest.importorskip("timm")
    from visionpeft.vit.models import build_vit

    path = _truncated_safetensors(tmp_path / "vit.safetensors")
    with pytest.raises(ConfigError, match=rf"model\.checkpoint: {re.escape(str(path))} is not a complete \.safetensors "
                                          "file: it is truncated or damaged"):
        build_vit("vit_tiny_patch16_224", 3, checkpoint=path, **TINY_VIT)


@pytest.fixture(scope="module")
def tiny_clip_arch(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    from tiny_models import TINY_CLIP_CFG

    path = tmp_path_factory.mktemp("cfg") / f"{TINY_CLIP}.json"
    path.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(path)
    return TINY_CLIP


def test_damaged_clip_checkpoints_are_config_errors_naming_the_file(tmp_path, tiny_clip_arch):
    from visionpeft.vla.models import load_clip

    truncated = _truncated_safetensors(tmp_path / "clip.safetensors")
    with pytest.raises(ConfigError, match=rf"model\.checkpoint: {re.escape(str(truncated))} is not a complete "
                                          r"\.safetensors file: it is truncated or damaged"):
        load_clip(tiny_clip_arch, checkpoint=str(truncated))
    pickled = _pickled_with_an_object(tmp_path / "clip.pt")
    with pytest.raises(ConfigError, match=rf"model\.checkpoint: {re.escape(str(pickled))} is a pickled checkpoint "
                                          r".*weights_only=False.*give .*clip\.safetensors instead"):
        load_clip(tiny_clip_arch, checkpoint=str(pickled))


def test_a_truncated_sdxl_embedding_is_a_data_error(tmp_path):
    from visionpeft.diffusion.embedding_export import load_sdxl_embedding

    path = _truncated_safetensors(tmp_path / "embedding.safetensors")
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} is not a complete \.safetensors file.*; export the "
                                        "embedding again"):
        load_sdxl_embedding(None, path, "<token>")


def test_a_file_that_cannot_be_opened_keeps_its_os_error(tmp_path):
    # Not a damaged file: the CLI reports the OSError with its path and what to do.
    with pytest.raises(FileNotFoundError):
        tensorfiles.read_torch(tmp_path / "missing.pt", error=DataError, fix="")
    with pytest.raises(FileNotFoundError):
        tensorfiles.read_safetensors(tmp_path / "missing.safetensors", error=DataError, fix="")


def test_files_that_are_not_utf8_are_named(tmp_path, capsys):
    from visionpeft.cli import main
    from visionpeft.errors import DataError
    from visionpeft.vit.data import read_list_file

    config = tmp_path / "run.yaml"
    config.write_bytes(b"task: vit\nmethod: {name: \xff\xfe}\n")
    assert main(["train", str(config)]) == 2
    assert f"error: {config} is not UTF-8 text" in capsys.readouterr().err
    listing = tmp_path / "train.txt"
    listing.write_bytes(b"a.png 0\n\x89PNG\xff\n")
    with pytest.raises(DataError, match=r"train\.txt is not UTF-8 text"):
        read_list_file(listing)


def test_an_adapter_config_may_only_name_a_weights_file_in_its_folder(tmp_path):
    import json

    import visionpeft as vp
    from visionpeft.errors import AdapterMismatchError

    from toy import toy_net

    vp.save(vp.attach(toy_net(), "lora", r=2), tmp_path)
    path = tmp_path / "adapter_config.json"
    payload = json.loads(path.read_text())
    for name in (3, "../adapter.safetensors", "/etc/passwd"):
        path.write_text(json.dumps({**payload, "weights": {**payload["weights"], "file": name}}))
        with pytest.raises(AdapterMismatchError, match="is not a file name in"):
            vp.load(toy_net(), tmp_path)


def test_a_damaged_trainer_state_summary_is_refused(tmp_path):
    from visionpeft import checkpoints
    from visionpeft.errors import TrainingError
    from visionpeft.hosts import register_host, unregister_host
    from visionpeft.train import Trainer

    from test_trainer import NET_HOST, NetTask, config

    register_host(NET_HOST)
    try:
        Trainer(NetTask(), config(max_steps=4), tmp_path / "run").fit(stop_after=2)
    finally:
        unregister_host(NET_HOST.family)
    found = checkpoints.find_checkpoint(tmp_path / "run")
    (found / checkpoints.STATE_SUMMARY_FILE).write_text("{damaged")
    with pytest.raises(TrainingError, match=r"trainer_state\.json is damaged"):
        checkpoints.read_state(found)
