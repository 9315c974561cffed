"""CLIP-Adapter and KgCoOp on tiny open_clip models: the originals' math, what trains, and the trainer's loss hook."""

from __future__ import annotations

import pytest

pytest.importorskip("open_clip")

import torch
import torch.nn.functional as F
from test_vla_task import NAMES as EUROSAT_NAMES
from test_vla_task import _config, eurosat_root, tiny_arch  # noqa: F401 (fixtures)
from torch import nn
from torch.utils.data import TensorDataset

import visionpeft as vp
from visionpeft.errors import ConfigError
from visionpeft.runconfig import TrainConfig
from visionpeft.task import Task
from visionpeft.train import Trainer
from visionpeft.vla.clip_adapter import Adapter
from visionpeft.vla.kgcoop import KgCoOp, kgcoop_template, knowledge_term

from tiny_models import tiny_clip, tiny_custom_text_clip

NAMES = ["dog", "golden_retriever", "cat", "sea_lion"]
NOVEL = ["horse", "tabby_cat", "eagle"]
BUILDERS = [pytest.param(tiny_clip, id="clip"), pytest.param(tiny_custom_text_clip, id="custom-text-clip")]


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _perturb(model: nn.Module, seed: int = 7, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _only_grads(model: nn.Module, trained: set[str]) -> None:
    """Every parameter named in ``trained`` got a nonzero gradient; every other one none."""
    for name, p in model.named_parameters():
        if name in trained:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


# -- CLIP-Adapter --


@pytest.mark.parametrize("build", BUILDERS)
@pytest.mark.parametrize("templates", [{}, {"dataset": "OxfordPets"}, {"template_set": "simple"}])
def test_ratio_zero_is_the_zero_shot_classifier_exactly(build, templates):
    zs_kwargs = {"template_set": "custom", **templates} if "dataset" in templates else templates
    adapted = vp.attach(build(0), "clip_adapter", classnames=NAMES, ratio=0.0, **templates).eval()
    _perturb(adapted)  # whatever the adapter holds, ratio 0 ignores it
    zeroshot = vp.attach(build(0), "zeroshot", classnames=NAMES, **zs_kwargs).eval()
    with torch.no_grad():
        assert torch.equal(adapted(_images()), zeroshot(_images()))


def test_default_template_is_the_data_sets_or_a_photo_of_a():
    clip = vp.attach(tiny_clip(0), "clip_adapter", classnames=NAMES, dataset="EuroSAT")
    assert clip.prompt_learner.templates == ["a centered satellite photo of {}."]
    clip = vp.attach(tiny_clip(0), "clip_adapter", classnames=NAMES)
    assert clip.prompt_learner.templates == ["a photo of a {}."]


def test_adapter_math_and_parameter_count():
    model = vp.attach(tiny_clip(0), "clip_adapter", classnames=NAMES).eval()
    width = model.clip.visual.output_dim
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trained.values()) == 2 * width * (width // 4)
    assert vp.summary(model)["trainable"] == 2 * width * (width // 4)
    assert sum(p.numel() for p in Adapter(1024, 4).parameters()) == 524_288  # RN50's
    assert all(not isinstance(m, nn.Linear) or m.bias is None for m in model.adapter.modules())
    images = _images()
    with torch.no_grad():
        f = model.clip.visual(images).float()
        down, up = model.adapter.fc[0].weight, model.adapter.fc[2].weight
        a = F.relu(F.relu(f @ down.T) @ up.T)
        expected = F.normalize(0.2 * a + 0.8 * f, dim=-1)
        torch.testing.assert_close(model.encode_images(images), expected)
        text = model.prompt_learner.weights()
        torch.testing.assert_close(model(images), model.clip.logit_scale.exp() * expected @ text.T)


@pytest.mark.parametrize("build", BUILDERS)
def test_gradients_reach_only_the_adapter(build):
    model = vp.attach(build(0), "clip_adapter", classnames=NAMES)
    model.train()
    F.cross_entropy(model(_images()), torch.tensor([0, 1, 2])).backward()
    _only_grads(model, {"adapter.fc.0.weight", "adapter.fc.2.weight"})


def test_clip_adapter_save_load_bit_for_bit(tmp_path):
    model = vp.attach(tiny_clip(0), "clip_adapter", classnames=NAMES, ratio=0.5, reduction=2).eval()
    _perturb(model)
    with torch.no_grad():
        expected = model(_images())
    vp.save(model, tmp_path)
    loaded = vp.load(tiny_clip(0), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(_images()), expected)
    assert loaded.adapter.fc[0].weight.shape == (32, 64)


def test_clip_adapter_base_to_novel():
    model = vp.attach(tiny_clip(0), "clip_adapter", classnames=NAMES).eval()
    _perturb(model)
    model.set_classnames(NOVEL)
    zeroshot = vp.attach(tiny_clip(0), "zeroshot", classnames=NOVEL).eval()
    with torch.no_grad():
        logits = model(_images())
        assert logits.shape == (3, len(NOVEL))
        expected = model.logits(model.encode_images(_images()), zeroshot.prompt_learner.weights())
        assert torch.equal(logits, expected)


def test_clip_adapter_bad_configs():
    with pytest.raises(ConfigError):
        vp.attach(tiny_clip(0), "clip_adapter", classnames=NAMES, ratio=1.5)
    with pytest.raises(ConfigError, match="reduction"):
        vp.attach(tiny_clip(0), "clip_adapter", classnames=NAMES, reduction=1000)


# -- KgCoOp --


def test_knowledge_term_on_a_hand_computed_case():
    learned = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    handcrafted = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # cosines 1 and 0: 1 - mean = 0.5, half the mean squared distance (0 and 2) of unit vectors
    assert knowledge_term(learned, handcrafted).item() == pytest.approx(0.5)
    assert knowledge_term(learned, handcrafted).item() == pytest.approx(0.5 * ((learned - handcrafted) ** 2).sum(-1)
                                                                      .mean().item())
    a, b = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    torch.testing.assert_close(knowledge_term(a, b), 1 - (a * b).sum(-1).mean())


def test_kgcoop_defaults_and_templates():
    model = vp.attach(tiny_clip(0), "kgcoop", classnames=NAMES)
    assert model.prompt_learner.ctx.shape[0] == 4 and model.prompt_learner.prefix_text == "a photo of a"
    assert model.handcrafted.templates == ["a photo of a {}."]
    assert kgcoop_template("DescribableTextures") == "a photo of a {}, a type of texture."
    assert kgcoop_template("dtd") == "a photo of a {}, a type of texture."
    assert kgcoop_template("OxfordPets") == "a photo of a {}, a type of pet."
    assert get_config(model).kg_weight == 8.0


def get_config(model):
    from visionpeft.method import attached_methods

    return attached_methods(model)[0].config


@pytest.mark.parametrize("build", BUILDERS)
def test_context_from_the_template_words_gives_zero(build):
    model = vp.attach(build(0), "kgcoop", classnames=NAMES).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.text_features(), model.handcrafted_features(), atol=1e-6, rtol=0)
        assert abs(model.knowledge_term().item()) < 1e-6
    other = vp.attach(build(0), "kgcoop", classnames=NAMES, template="a blurry photo of a {}.").eval()
    with torch.no_grad():
        assert other.knowledge_term().item() > 1e-4


@pytest.mark.parametrize("build", BUILDERS)
def test_gradients_of_the_term_reach_only_the_context(build):
    model = vp.attach(build(0), "kgcoop", classnames=NAMES)
    _perturb(model)  # at the template's words the term is at its minimum and its gradient vanishes
    model.train()
    model.knowledge_term().backward()
    _only_grads(model, {"prompt_learner.ctx"})


def test_kgcoop_base_to_novel_rebuilds_the_handcrafted_features():
    model = vp.attach(tiny_clip(0), "kgcoop", classnames=NAMES).eval()
    model.set_classnames(NOVEL)
    assert model.handcrafted.classnames == NOVEL
    with torch.no_grad():
        assert model.handcrafted_features().shape[0] == len(NOVEL)
        assert abs(model.knowledge_term().item()) < 1e-6


def test_loss_term_hook_uses_the_last_training_forward():
    model = vp.attach(tiny_clip(0), "kgcoop", classnames=NAMES, template="a blurry photo of a {}.")
    method = KgCoOp(get_config(model))
    with torch.no_grad():
        model(_images())
    assert method.loss_term(model) is None  # no training forward
    model(_images())
    term = method.loss_term(model)
    assert term.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(term, 8.0 * model.knowledge_term())
    assert method.loss_term(model) is None  # used once


class KgTask(Task):
    """Classify random images with a tiny CLIP and KgCoOp; records each CE value."""

    name = "tests-kgcoop"

    def __init__(self) -> None:
        super().__init__(None)
        self.ce: list[float] = []

    def build_model(self, adapter=None) -> nn.Module:
        return vp.attach(tiny_clip(0), "kgcoop", classnames=NAMES, template="a blurry photo of a {}.")

    def train_dataset(self) -> TensorDataset:
        g = torch.Generator().manual_seed(1)
        return TensorDataset(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, len(NAMES), (8,), generator=g))

    def eval_dataset(self):
        return None

    def loss(self, model: nn.Module, batch) -> torch.Tensor:
        images, labels = batch
        ce = F.cross_entropy(model(images), labels)
        self.ce.append(float(ce.detach()))
        return ce


def test_the_trainer_adds_the_term_to_the_loss(tmp_path, monkeypatch):
    terms: list[tuple[float, float]] = []
    original = KgCoOp.loss_term

    def spy(self, model):
        learned = model._learned_features
        term = original(self, model)
        terms.append((float(term.detach()), float(knowledge_term(learned, model.handcrafted_features()).detach())))
        return term

    totals: list[float] = []
    checked = Trainer._checked_loss

    def record(self, loss, epoch, batch):
        totals.append(float(loss.detach()))
        return checked(self, loss, epoch, batch)

    monkeypatch.setattr(KgCoOp, "loss_term", spy)
    monkeypatch.setattr(Trainer, "_checked_loss", record)
    task = KgTask()
    train = TrainConfig(max_steps=2, batch_size=4, lr=0.01, progress=False, log_every=1, warmup_steps=0)
    Trainer(task, train, tmp_path / "run").fit()
    assert len(terms) == len(totals) == len(task.ce) == 2
    for (term, unweighted), ce, total in zip(terms, task.ce, totals, strict=True):
        assert unweighted > 0
        assert term == pytest.approx(8.0 * unweighted, rel=1e-6)
        assert total == pytest.approx(ce + 8.0 * unweighted, rel=1e-6)


def test_a_model_after_a_training_forward_can_be_copied():
    import copy

    model = vp.attach(tiny_clip(0), "kgcoop", classnames=NAMES)
    model(_images())
    assert model._learned_features is not None
    twin = copy.deepcopy(model)
    assert twin._learned_features is None and model._learned_features is not None
    with torch.no_grad():
        assert torch.equal(twin.eval()(_images()), model.eval()(_images()))


# -- through the vla task --


@pytest.mark.parametrize("method", [{"name": "clip_adapter"}, {"name": "kgcoop"}])
def test_train_then_eval_base_to_novel_with_the_vla_task(tmp_path, eurosat_root, tiny_arch, method):  # noqa: F811
    import json

    from visionpeft.cli import main
    from visionpeft.vla.templates import template_for

    path = _config(tmp_path, eurosat_root, tiny_arch, method, setting="base2novel", epochs=1)
    assert main(["train", str(path)]) == 0
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert {"base", "novel", "hm"} <= set(results)
    saved = json.loads((run / "adapter" / "adapter_config.json").read_text())["config"]
    assert saved["dataset"] == "EuroSAT" and saved["classnames"] == EUROSAT_NAMES[:2]
    (run / "results.json").unlink()
    assert main(["eval", str(path), "--adapter", str(run / "adapter")]) == 0
    again = json.loads((run / "results.json").read_text())
    assert again["base"] == results["base"] and again["novel"] == results["novel"]
    assert template_for("EuroSAT") == "a centered satellite photo of {}."
