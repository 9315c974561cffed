"""Adapter files: content, atomic writes, checksums and base-model fingerprints."""

from __future__ import annotations

import copy
import errno
import json
import multiprocessing
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

import visionpeft as vp
from visionpeft import files
from visionpeft.errors import AdapterMismatchError
from visionpeft.method import get_state

from toy import toy_inputs, toy_net


def _adapted(method: str = "lora", seed: int = 0, **kwargs):
    model = vp.attach(toy_net(seed), method, **kwargs)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    return model


def test_folder_holds_only_trained_tensors_and_a_full_config(tmp_path):
    model = _adapted(r=4)
    vp.save(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter_config.json"]
    tensors = load_file(tmp_path / "adapter.safetensors")
    trained = get_state(model).adapters["default"].method.trained_tensors(model)
    assert set(tensors) == set(trained)
    assert "blocks.0.fc1.lora_A.weight" in tensors and "head.weight" in tensors
    assert not any("base_layer" in k or ".default." in k for k in tensors)
    payload = json.loads((tmp_path / "adapter_config.json").read_text())
    assert payload["method"] == "lora" and payload["config"]["r"] == 4
    assert payload["base_model"]["family"] == "tests.ToyNet"
    assert payload["base_model"]["fingerprint"].startswith("sha256:")
    assert payload["base_model"]["parameters"]["blocks.0.fc1.weight"] == [32, 16]
    assert {"visionpeft", "torch", "peft"} <= set(payload["versions"])
    assert payload["weights"]["num_tensors"] == len(tensors)


def test_the_fingerprint_describes_the_unadapted_base():
    base = toy_net()
    expected = files.fingerprint(base)
    adapted = vp.attach(base, "lora")
    assert get_state(adapted).base == expected
    assert files.fingerprint(adapted) != expected


def test_mismatch_message_says_what_differs(tmp_path):
    vp.save(_adapted(), tmp_path)
    wider = toy_net(width=24)
    with pytest.raises(AdapterMismatchError, match=r"shape \(adapter's base vs this model\): embed\.proj\.weight"):
        vp.load(wider, tmp_path)
    assert get_state(wider) is None


def test_same_shapes_other_weights_is_allowed(tmp_path):
    # The fingerprint is about architecture (names and shapes); values are the user's choice.
    model = _adapted()
    vp.save(model, tmp_path)
    vp.load(toy_net(seed=5), tmp_path)


def test_a_save_interrupted_between_its_two_writes_loads_the_new_adapter(tmp_path, monkeypatch, caplog):
    old = _adapted()
    vp.save(old, tmp_path)
    new = _adapted("bitfit", seed=0)
    expected = new(toy_inputs())

    def crash(path, text):
        raise KeyboardInterrupt("killed before the config was written")

    monkeypatch.setattr(files, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        vp.save(new, tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["method"] == "lora"  # the old JSON
    loaded = vp.load(toy_net(), tmp_path)
    assert get_state(loaded).adapters["default"].method.name == "bitfit"
    assert torch.equal(loaded(toy_inputs()), expected)
    assert "interrupted" in caplog.text


@pytest.mark.parametrize("interrupted", [False, True])
def test_a_load_reads_and_hashes_the_weights_once(tmp_path, monkeypatch, interrupted):
    from pathlib import Path
    from types import SimpleNamespace

    vp.save(_adapted(), tmp_path)
    if interrupted:  # the JSON no longer describes the weights: the config comes from the weights' metadata
        path = tmp_path / files.CONFIG_NAME
        path.write_text(json.dumps({**json.loads(path.read_text()), "weights": {"file": files.WEIGHTS_NAME}}))
    weights = tmp_path / files.WEIGHTS_NAME
    blob = weights.read_bytes()
    reads, hashes = [], []
    real_read_bytes, real_sha256 = Path.read_bytes, files.hashlib.sha256

    def read_bytes(path):
        reads.append(path)
        return real_read_bytes(path)

    def sha256(data=b""):
        hashes.append(data)
        return real_sha256(data)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    monkeypatch.setattr(files, "hashlib", SimpleNamespace(sha256=sha256))
    loaded = vp.load(toy_net(), tmp_path)
    monkeypatch.undo()
    assert get_state(loaded).adapters["default"].method.name == "lora"
    assert reads.count(weights) == 1
    assert sum(data == blob for data in hashes) == 1


def test_safetensors_metadata_is_read_from_the_header(tmp_path):
    from safetensors.torch import save_file

    from visionpeft.errors import AdapterError

    save_file({"a": torch.zeros(2)}, tmp_path / "a.safetensors", metadata={"k": "v"})
    save_file({"a": torch.zeros(2)}, tmp_path / "b.safetensors")
    assert files.read_safetensors_metadata(tmp_path / "a.safetensors") == {"k": "v"}
    assert files.read_safetensors_metadata(tmp_path / "b.safetensors") == {}
    (tmp_path / "c.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match=r"c\.safetensors is not a readable \.safetensors file"):
        files.read_safetensors_metadata(tmp_path / "c.safetensors")


def test_foreign_weights_without_their_config_are_detected(tmp_path):
    from safetensors.torch import save_file

    vp.save(_adapted(), tmp_path)
    save_file({"blocks.0.fc1.lora_A.weight": torch.zeros(8, 16)}, tmp_path / "adapter.safetensors")
    with pytest.raises(AdapterMismatchError, match="checksum"):
        vp.load(toy_net(), tmp_path)


def test_missing_or_damaged_files_are_explained(tmp_path):
    with pytest.raises(AdapterMismatchError, match=r"adapter_config\.json is missing"):
        vp.load(toy_net(), tmp_path)
    vp.save(_adapted(), tmp_path)
    (tmp_path / "adapter.safetensors").unlink()
    with pytest.raises(AdapterMismatchError, match="incomplete"):
        vp.load(toy_net(), tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterMismatchError, match="not valid JSON"):
        vp.load(toy_net(), tmp_path)


def test_newer_format_version_is_refused(tmp_path):
    vp.save(_adapted(), tmp_path)
    path = tmp_path / "adapter_config.json"
    payload = json.loads(path.read_text())
    path.write_text(json.dumps({**payload, "format_version": 2}))
    with pytest.raises(AdapterMismatchError, match="format_version 2"):
        vp.load(toy_net(), tmp_path)


def test_wrong_tensor_shapes_leave_the_model_as_it_was(tmp_path):
    vp.save(_adapted(r=4), tmp_path)
    payload = json.loads((tmp_path / "adapter_config.json").read_text())
    # A consistent folder (both files, both checksums) whose config disagrees with its tensors: editing a
    # file by hand no longer gets that far (see the next tests), so it is written as a buggy plugin would.
    files.write_adapter(tmp_path, method="lora", adapter_name="default", config={**payload["config"], "r": 2},
                        base=payload["base_model"], tensors=files.read_adapter(tmp_path)[1])
    model = toy_net()
    reference = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterMismatchError, match="shape differs"):
        vp.load(model, tmp_path)
    assert get_state(model) is None
    assert list(model.state_dict()) == list(reference)
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())


def test_an_edited_config_beside_intact_weights_is_refused(tmp_path):
    """The JSON's checksum covers the weights; the weights' copy of the config covers the JSON."""
    vp.save(_adapted(), tmp_path)
    path = tmp_path / "adapter_config.json"
    payload = json.loads(path.read_text())
    payload["config"]["alpha"] = payload["config"]["alpha"] + 1.0
    path.write_text(json.dumps(payload))
    with pytest.raises(AdapterMismatchError, match=r"adapter_config.json was changed or is damaged: its config differ"):
        vp.load(toy_net(), tmp_path)


def test_a_changed_config_inside_the_weights_is_refused_in_crash_recovery(tmp_path):
    """The weights' own checksum covers the config they carry, which crash recovery would trust."""
    vp.save(_adapted(), tmp_path)
    weights = tmp_path / "adapter.safetensors"
    blob = weights.read_bytes()
    assert b'\\"alpha\\": 8.0' in blob  # the embedded config, as JSON inside the JSON header
    weights.write_bytes(blob.replace(b'\\"alpha\\": 8.0', b'\\"alpha\\": 9.0', 1))  # same length
    with pytest.raises(AdapterMismatchError, match="is damaged: its tensors match neither"):
        vp.load(toy_net(), tmp_path)


def _slow_writer(path: str, started) -> None:
    """In a child process: write a large file in slow chunks through atomic_write_bytes."""
    real_fdopen = os.fdopen

    def slow_fdopen(fd, mode):
        handle = real_fdopen(fd, mode)
        write = handle.write

        def chunked(data):
            started.set()
            for i in range(0, len(data), 1024):
                write(data[i : i + 1024])
                handle.flush()
                time.sleep(0.01)
            return len(data)

        handle.write = chunked
        return handle

    os.fdopen = slow_fdopen  # this process is a throw-away fork
    files.atomic_write_bytes(path, b"new" * 100_000)


def test_a_save_killed_midway_leaves_the_previous_file(tmp_path):
    model = _adapted()
    vp.save(model, tmp_path)
    expected = model(toy_inputs())
    target = tmp_path / "adapter.safetensors"
    before = target.read_bytes()
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    proc = ctx.Process(target=_slow_writer, args=(str(target), started))
    proc.start()
    assert started.wait(30)
    time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    assert proc.exitcode == -signal.SIGKILL
    assert target.read_bytes() == before
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers, "the killed writer should have left its temporary file, not touched the target"
    loaded = vp.load(toy_net(), tmp_path)
    assert torch.equal(loaded(toy_inputs()), expected)


def test_atomic_write_cleans_up_after_an_error(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    files.atomic_write_bytes(target, b"old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        files.atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_failed_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    # A full disk shows at write or fsync time, as an OSError that names no file.
    target = tmp_path / "f.bin"

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError) as caught:
        files.atomic_write_bytes(target, b"new")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert os.listdir(tmp_path) == []


# --- damaged weights ------------------------------------------------------------------------------


def _flip_a_tensor_byte(path) -> None:
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0x01  # the last bytes of the file are tensor data, after the header
    path.write_bytes(bytes(blob))


def test_a_flipped_bit_in_the_tensor_data_is_refused_naming_the_file(tmp_path):
    vp.save(_adapted(), tmp_path)
    _flip_a_tensor_byte(tmp_path / files.WEIGHTS_NAME)
    model = toy_net()
    with pytest.raises(AdapterMismatchError, match=r"adapter\.safetensors is damaged: its tensors match neither the "
                                                   r"checksum stored in the file.*Save the adapter again, or restore"):
        vp.load(model, tmp_path)
    assert get_state(model) is None


def test_a_flipped_bit_after_an_interrupted_save_is_refused(tmp_path, monkeypatch):
    vp.save(_adapted(), tmp_path)
    monkeypatch.setattr(files, "atomic_write_text", lambda path, text: None)  # the JSON write never happens
    vp.save(_adapted("bitfit"), tmp_path)
    monkeypatch.undo()
    vp.load(toy_net(), tmp_path)  # the new weights beside the old JSON: the interrupted save loads
    _flip_a_tensor_byte(tmp_path / files.WEIGHTS_NAME)
    with pytest.raises(AdapterMismatchError, match=r"adapter\.safetensors is damaged"):
        vp.load(toy_net(), tmp_path)


@pytest.mark.parametrize("keep", [20, -10], ids=["in-the-header", "in-the-data"])
def test_a_truncated_weights_file_is_refused_naming_the_file(tmp_path, keep):
    vp.save(_adapted(), tmp_path)
    weights = tmp_path / files.WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:keep])
    with pytest.raises(AdapterMismatchError, match=r"adapter\.safetensors is not a complete safetensors file \(it is "
                                                   r"(truncated|shorter)"):
        vp.load(toy_net(), tmp_path)


def _as_written_by_an_older_visionpeft(folder, *, update_json: bool) -> None:
    """Rewrite the weights without the tensors' digest in their metadata, as visionpeft 0.1.0 wrote them."""
    from safetensors import safe_open
    from safetensors.torch import save

    weights = folder / files.WEIGHTS_NAME
    with safe_open(str(weights), "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != files.TENSORS_DIGEST_KEY}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open handles are not iterable)
    blob = save(tensors, metadata=metadata)
    weights.write_bytes(blob)
    if update_json:
        path = folder / files.CONFIG_NAME
        payload = json.loads(path.read_text())
        payload["weights"]["sha256"] = files.hashlib.sha256(blob).hexdigest()
        path.write_text(json.dumps(payload))


def test_old_weights_load_with_their_json_and_are_refused_without_it(tmp_path):
    model = _adapted()
    expected = model(toy_inputs())
    vp.save(model, tmp_path / "whole")
    _as_written_by_an_older_visionpeft(tmp_path / "whole", update_json=True)
    assert torch.equal(vp.load(toy_net(), tmp_path / "whole")(toy_inputs()), expected)
    # Beside a JSON that does not describe them, old weights cannot be told from damaged ones.
    vp.save(model, tmp_path / "interrupted")
    _as_written_by_an_older_visionpeft(tmp_path / "interrupted", update_json=False)
    with pytest.raises(AdapterMismatchError, match=r"adapter\.safetensors does not match the checksum recorded in "
                                                   r"adapter_config\.json, and it was written by an older visionpeft"):
        vp.load(toy_net(), tmp_path / "interrupted")


# --- file modes -----------------------------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_written_files_and_folders_get_the_modes_the_umask_gives(tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        for mask, file_mode, folder_mode in [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)]:
            os.umask(mask)
            root = tmp_path / oct(mask)
            vp.save(_adapted(), root / "adapter")
            files.atomic_write_text(root / "config.yaml", "a: 1\n")
            files.replace_folder(root / "whole", lambda folder: files.atomic_write_text(folder / "f.txt", "x"))
            for path, mode in [(root / "adapter", folder_mode), (root / "adapter" / files.WEIGHTS_NAME, file_mode),
                               (root / "adapter" / files.CONFIG_NAME, file_mode), (root / "config.yaml", file_mode),
                               (root / "whole", folder_mode), (root / "whole" / "f.txt", file_mode)]:
                assert stat.S_IMODE(path.stat().st_mode) == mode, (oct(mask), path.relative_to(tmp_path))
    finally:
        os.umask(old)


def test_read_image_names_the_bad_file_and_the_fix(tmp_path):
    from PIL import Image

    from visionpeft.errors import DataError
    from visionpeft.images import image_problem, read_image

    good = tmp_path / "good.png"
    Image.new("L", (4, 3), 7).save(good)
    assert read_image(good).mode == "RGB" and read_image(good, mode=None).mode == "L"
    broken = tmp_path / "broken.png"
    broken.write_bytes(good.read_bytes()[:20])
    with pytest.raises(DataError, match=r"cannot read image .*broken.png: .*; fix or remove it, or pass skip_bad=True"):
        read_image(broken)
    with pytest.raises(DataError, match="missing.png: no such file; fix or remove it, or set data.skip_bad: true"):
        read_image(tmp_path / "missing.png", hint="set data.skip_bad: true")
    assert image_problem(good) is None and image_problem(broken) and image_problem(tmp_path / "x") == "no such file"


def test_check_images_drops_and_counts_or_names_the_first_missing_file(tmp_path, caplog):
    import logging

    from PIL import Image

    from visionpeft.errors import DataError
    from visionpeft.images import check_images

    good = tmp_path / "good.png"
    Image.new("RGB", (4, 4)).save(good)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    items = [(good, 0), (tmp_path / "broken.png", 1), (tmp_path / "gone.png", 2), (tmp_path / "gone2.png", 3)]
    with caplog.at_level(logging.WARNING, logger="visionpeft"):
        kept, skipped = check_images(items, lambda item: item[0], skip_bad=True, source="the list")
    assert kept == items[:1] and skipped == [item[0] for item in items[1:]]
    assert "skipped 3 of 4 unreadable image(s) in the list" in caplog.text
    with pytest.raises(DataError, match=r"gone\.png: no such file; fix or remove it, or set data\.skip_bad: true "
                                        r"\(and 1 more missing\)"):
        check_images(items, lambda item: item[0], skip_bad=False, source="the list", hint="set data.skip_bad: true")
    assert check_images(items[:2], lambda item: item[0], skip_bad=False, source="the list") == (items[:2], [])
