"""The diffusion task's evaluation: a denoising loss fixed by images, timesteps and seed, grids, eval."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("diffusers")

import torch
import yaml
from test_diffusion_task import _image
from torch.utils.data import DataLoader

from visionpeft.cli import main
from visionpeft.diffusion.evaluation import denoising_totals, eval_noise
from visionpeft.errors import ConfigError
from visionpeft.runconfig import parse_run_config
from visionpeft.task import get_task

from tiny_models import save_tiny_sd_pipeline


@pytest.fixture(scope="module")
def tiny_run_inputs(tmp_path_factory):
    """A saved tiny SD pipeline and two captioned training images (as tests/test_diffusion_task.py's)."""
    root = tmp_path_factory.mktemp("diffusion-eval")
    pipeline = save_tiny_sd_pipeline(root / "tiny-sd")
    for i in range(2):
        _image(root / "images" / f"{i}.png", size=(40, 36), seed=i)
    (root / "images" / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"a photo number {i}"}) for i in range(2)))
    return root, pipeline


def _tree(root, pipeline, output, **data) -> dict:
    return {
        "task": "diffusion", "model": {"name": str(pipeline)}, "method": {"name": "lora", "r": 2},
        "data": {"root": str(root / "images"), "resolution": 32, "eval_timesteps": [10, 500],
                 "sampling": {"steps": 2}, **data},
        "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3, "progress": False, "eval_every": 1},
        "output_dir": str(output),
    }


def _task(tree: dict):
    task = get_task("diffusion")(parse_run_config(tree))
    return task, task.build_model()


def _totals(task, model, batch_size: int) -> dict:
    loader = DataLoader(task.eval_dataset(), batch_size=batch_size, collate_fn=task.collate)
    with torch.no_grad():
        return denoising_totals(model, loader, task.data.eval_timesteps, task.data.eval_seed)


def test_the_loss_depends_on_images_timesteps_and_seed_only(tiny_run_inputs, tmp_path):
    root, pipeline = tiny_run_inputs
    task, model = _task(_tree(root, pipeline, tmp_path / "run"))
    torch.manual_seed(1)
    first = _totals(task, model, batch_size=2)
    state = torch.get_rng_state()
    torch.manual_seed(2)
    assert _totals(task, model, batch_size=2) == first  # the global RNG plays no part
    torch.manual_seed(1)
    _totals(task, model, batch_size=2)
    assert torch.equal(torch.get_rng_state(), state)  # and is not drawn from
    one_by_one = _totals(task, model, batch_size=1)
    assert one_by_one.keys() == first.keys() and first["images"] == 2
    assert all(one_by_one[k] == pytest.approx(first[k], rel=1e-5) for k in first)
    other, other_model = _task(_tree(root, pipeline, tmp_path / "other", eval_seed=7))
    assert _totals(other, other_model, batch_size=2)["loss_sum"] != pytest.approx(first["loss_sum"], rel=1e-3)


def test_the_loss_is_the_plain_error_of_the_prediction_at_the_fixed_noise(tiny_run_inputs, tmp_path):
    root, pipeline = tiny_run_inputs
    task, model = _task(_tree(root, pipeline, tmp_path / "run", eval_images=1))
    batch = task.collate([task.eval_dataset()[0]])
    with torch.no_grad():
        latents = model.vae.encode(batch["pixel_values"]).latent_dist.mean * model.vae.config.scaling_factor
        noise = eval_noise(0, 0, 2, latents.shape[1:])[1][None]
        t = torch.tensor([500])
        noisy = model.noise_scheduler.add_noise(latents, noise, t)
        pred = model.unet(noisy, t, encoder_hidden_states=model.text_encoder(batch["input_ids"])[0]).sample
    expected = ((pred - noise) ** 2).mean().item()
    totals = _totals(task, model, batch_size=1)
    assert totals["loss_sum_t500"] == pytest.approx(expected, rel=1e-5)
    assert task.summarize(totals)["loss_t500"] == pytest.approx(expected, rel=1e-5)


def test_training_evaluates_every_eval_every_steps_and_eval_repeats_the_last(tiny_run_inputs, tmp_path, capsys):
    root, pipeline = tiny_run_inputs
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_tree(root, pipeline, tmp_path / "run")))
    assert main(["train", str(config)]) == 0
    capsys.readouterr()
    out = tmp_path / "run"
    evals = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval" in r]
    assert [r["step"] for r in evals] == [1, 2]
    final = evals[-1]["eval"]
    assert final["images"] == 2 and final["eval_set"] == "training_images" and {"loss_t10", "loss_t500"} <= set(final)
    # No sampling.prompts: the captions of the first training images.
    assert final["samples"] == 2 and (out / final["grid"]).is_file()
    sidecar = json.loads((out / final["grid"]).with_suffix(".json").read_text())
    assert [p["prompt"] for p in sidecar["prompts"]] == ["a photo number 0", "a photo number 1"]
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 2 and results["loss"] == final["loss"] and "not held out" in results["eval_images"]
    assert main(["eval", str(config), "--adapter", str(out / "adapter")]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["loss"] == pytest.approx(final["loss"], rel=1e-6) and again["images"] == 2
    assert (out / "samples" / "step-0000000_seed-0.png").is_file()


def test_held_out_images_and_the_default_prompts_of_dreambooth(tiny_run_inputs, tmp_path, capsys):
    root, pipeline = tiny_run_inputs
    for i in range(3):
        _image(tmp_path / "held-out" / f"{i}.png", size=(36, 36), seed=20 + i)
    tree = _tree(root, pipeline, tmp_path / "run", eval_root=str(tmp_path / "held-out"), eval_images=-1,
                 instance_prompt="a photo of sks dog")
    tree["train"]["eval_every"] = 0
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tree))
    assert main(["train", str(config)]) == 0
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval"]
    assert final["images"] == 3 and final["eval_set"] == "held_out" and final["samples"] == 4
    sidecar = json.loads((tmp_path / "run" / final["grid"]).with_suffix(".json").read_text())
    assert [(p["prompt"], p["seed"]) for p in sidecar["prompts"]] == [("a photo of sks dog", s) for s in range(4)]
    assert "held-out" in json.loads((tmp_path / "run" / "results.json").read_text())["eval_images"]


def test_no_grids_with_empty_prompts_and_no_evaluation_says_which_keys(tiny_run_inputs, tmp_path, capsys):
    root, pipeline = tiny_run_inputs
    task, _ = _task(_tree(root, pipeline, tmp_path / "run", sampling={"prompts": []}))
    assert "samples" not in task.summarize(_totals(task, task._model, batch_size=2))
    grids_only, _ = _task(_tree(root, pipeline, tmp_path / "run", eval_images=0, sampling={"prompts": ["a cat"]}))
    assert len(grids_only.eval_dataset()) == 0  # an evaluation with no loss, only the grid
    assert grids_only.summarize(_totals(grids_only, grids_only._model, batch_size=2)) == {
        "samples": 1, "grid": "samples/step-0000000_seed-0.png"}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_tree(root, pipeline, tmp_path / "run", eval_images=0, sampling={"prompts": []})))
    assert main(["eval", str(config)]) == 2
    err = capsys.readouterr().err
    assert "data.eval_images" in err and "data.sampling.prompts" in err and "eval_split" not in err


@pytest.mark.parametrize(("data", "message"), [
    ({"eval_split": "test"}, "data.eval_split: the diffusion task has no splits; give held-out images as "
                             "data.eval_root"),
    ({"eval_timesteps": [10, 10]}, r"data.eval_timesteps: \[10, 10\] repeats a timestep"),
    ({"eval_timesteps": []}, "data.eval_timesteps: empty"),
    ({"eval_timesteps": [-1]}, "data.eval_timesteps: -1 is out of range"),
    ({"eval_root": "/nonexistent"}, "data.eval_root: /nonexistent is not a folder"),
    ({"eval_images": 0, "eval_root": "."}, "data.eval_images is 0"),
    ({"sampling": {"conditions": ["c.png"]}}, "data.sampling.conditions: give data.sampling.prompts too"),
])
def test_evaluation_keys_are_checked_with_their_path(tmp_path, data, message):
    tree = {"task": "diffusion", "model": {"name": "x"}, "method": {"name": "lora"},
            "data": {"root": str(tmp_path), **data}, "train": {"max_steps": 1}, "output_dir": str(tmp_path / "run")}
    with pytest.raises(ConfigError, match=message):
        parse_run_config(tree)


def test_a_timestep_the_scheduler_does_not_have_is_refused_before_training(tiny_run_inputs, tmp_path):
    root, pipeline = tiny_run_inputs
    task, _ = _task(_tree(root, pipeline, tmp_path / "run", eval_timesteps=[999, 1000]))
    with pytest.raises(ConfigError, match=r"data.eval_timesteps: 1000 is not a timestep .* \(0 to 999\)"):
        task.eval_dataset()
