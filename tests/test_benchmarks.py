"""The benchmark harness (benchmarks/harness.py): ratios in the right order, per-process memory, errors.

The builds below are module-level so that the spawned workers can unpickle them by reference.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from harness import Contender, ContenderError, compare, ratios, rotated, table

ARRAY_BYTES = 200 * 2**20


def _burn(seconds: float) -> None:
    """Spend about ``seconds`` of CPU time."""
    end = time.process_time() + seconds
    x = 0
    while time.process_time() < end:
        x += 1


def build_burn(seconds: float):
    """A step that burns ``seconds`` of CPU, with an info dict that the step adds to."""
    info = {"seconds": seconds, "calls": 0}

    def step() -> None:
        _burn(seconds)
        info["calls"] += 1

    return step, info


def build_alloc(nbytes: int, seconds: float):
    """A step that fills a fresh ``nbytes`` array (resident while the step runs), then frees it."""
    import numpy as np

    def step() -> None:
        array = np.ones(nbytes, dtype=np.uint8)
        _burn(seconds)
        del array

    return step


def build_fails_in_step():
    """A step that raises."""

    def step() -> None:
        raise ValueError("deliberate failure in the step")

    return step


def build_fails():
    """A build that raises."""
    raise RuntimeError("deliberate failure in the build")


def test_rotated_changes_who_goes_first():
    assert [rotated("abc", i) for i in range(4)] == [list("abc"), list("bca"), list("cab"), list("abc")]


def test_compare_orders_ratios_and_measures_memory_per_process():
    results = compare([Contender("slow", build_burn, {"seconds": 0.06}),
                       Contender("fast", build_burn, {"seconds": 0.03}),
                       Contender("alloc", build_alloc, {"nbytes": ARRAY_BYTES, "seconds": 0.03})],
                      rounds=3, warmup=1)
    assert all(len(r.times) == 3 for r in results.values())
    assert results["slow"].info == {"seconds": 0.06, "calls": 4}  # as after the last step
    by_ratio = ratios(results, "slow")
    assert by_ratio["slow"] == (1.0, 1.0)
    median_ratio, min_ratio = by_ratio["fast"]  # half the CPU of "slow"
    assert 0.3 < median_ratio < 0.75 and 0.3 < min_ratio < 0.75
    # The step's array is resident on top of the built process; a few hundred KiB that were resident
    # at the base (freed heap) can be reused for it, hence 99 %.
    assert results["alloc"].above_base >= 0.99 * ARRAY_BYTES
    assert results["fast"].above_base < ARRAY_BYTES / 10
    assert results["fast"].cuda_peak is None
    text = table(results, "slow")
    assert text.count("\n") == 4 and "| alloc |" in text


@pytest.mark.parametrize("build, phase, message", [
    (build_fails_in_step, "step (round 1)", "deliberate failure in the step"),
    (build_fails, "build", "deliberate failure in the build"),
])
def test_worker_error_names_the_contender_and_leaves_no_child(build, phase, message):
    with pytest.raises(ContenderError) as info:
        compare([Contender("fine", build_burn, {"seconds": 0.01}), Contender("broken", build)], rounds=1, warmup=0)
    text = str(info.value)
    assert "'broken'" in text and phase in text and message in text and "Traceback" in text
    assert multiprocessing.active_children() == []


# --- the benchmarks' own builds, in this process on tiny models (no timing) ------------------------


@pytest.fixture
def one_thread():
    """One torch thread, as the benchmarks' workers run: two threads on a busy 2-core machine can be 50x slower."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_vit_builds_run_and_report_trainable_and_flops(one_thread):
    pytest.importorskip("timm")
    import vit_speed

    infos = {}
    for name in ("lora", "lora (peft forward)", "vpt-deep"):  # VPT: FlopCounterMode's module tracker fails on it
        step, infos[name] = vit_speed.build_train(name, "vit_tiny_patch16_224", 32, 2, "fp32", "cpu", flops=True)
        step()
        step()
        assert infos[name]["trainable"] > 0 and infos[name]["flops"] > 0, name
    assert infos["lora (peft forward)"]["lora"] == "fast path off (0 fast layers)"
    assert infos["lora"]["lora"].startswith("fast path on (") and not infos["lora"]["lora"].endswith("(0 fast layers)")
    step, _ = vit_speed.build_infer("lora (merged)", "vit_tiny_patch16_224", 32, 2, "fp32", "cpu", flops=False)
    step()


def test_compare_peft_adapts_the_same_modules_as_visionpeft(one_thread):
    pytest.importorskip("peft")
    import compare_peft

    _, ours = compare_peft.adapted_model("visionpeft lora", "vit_tiny_patch16_224", 32)
    _, theirs = compare_peft.adapted_model("peft lora", "vit_tiny_patch16_224", 32)
    assert ours["adapted"] == theirs["adapted"] and len(ours["adapted"]) == 4 * 12
    assert ours["trainable"] == theirs["trainable"]
    assert "patch_embed.proj" not in theirs["adapted"]


def test_diffusion_builds_run_on_the_tiny_pipeline(one_thread):
    pytest.importorskip("diffusers")
    import diffusion_speed

    infos = {}
    for name in diffusion_speed.BUILDERS:
        step, infos[name] = diffusion_speed.build(name, "tiny", 1, 16, "cpu")
        step()
        assert infos[name]["trainable"] > 0 and "state_bytes" in infos[name], name
    assert infos["textual_inversion"]["input_ids"] == infos["textual_inversion (diffusers)"]["input_ids"]
    assert infos["lora"]["trainable"] == infos["lora (unet.add_adapter)"]["trainable"]
    assert infos["t2i_adapter (UNet not frozen)"]["grad_bytes"] > infos["t2i_adapter"]["grad_bytes"]
