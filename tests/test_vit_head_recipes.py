"""The papers' head recipes (``head: vpt | adaptformer | st_adapter``) and the vit recipes that select them."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import visionpeft as vp
from visionpeft.method import get_state, set_train_mode
from visionpeft.runconfig import parse_run_config
from visionpeft.vit.base import VPT_HEAD_BIAS, RecipeHead

timm = pytest.importorskip("timm")

from visionpeft.vit.task import VitTask  # noqa: E402
from visionpeft.vit.video import VideoClassifier  # noqa: E402

DIM = 192  # vit_tiny's width: the head's fan-in
TINY = {"img_size": 32, "patch_size": 8, "depth": 2}
FRAMES = 2


def image_model(num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, **TINY)


def video_model(num_classes: int = 10, seed: int = 0) -> nn.Module:
    return VideoClassifier(image_model(num_classes, seed), FRAMES)


def build(method: str, head: str, num_classes: int = 10, seed: int = 0) -> nn.Module:
    """``method`` attached with the head recipe ``head``, on a video model for st_adapter."""
    model = video_model(num_classes, seed) if method == "st_adapter" else image_model(num_classes, seed)
    torch.manual_seed(seed + 1)
    return vp.attach(model, method, head=head)


def inputs(method: str, batch: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (batch, FRAMES, 3, 32, 32) if method == "st_adapter" else (batch, 3, 32, 32)
    return torch.randn(shape, generator=g)


def head_copy(model: nn.Module) -> nn.Module:
    vit = model.vit if isinstance(model, VideoClassifier) else model
    return vit.head.copies["default"]


def head_input(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The features the head copy reads and the model's output, from one forward pass."""
    seen = []
    handle = head_copy(model).register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        out = model(x)
    finally:
        handle.remove()
    return seen[0], out


# --- each head is what the paper's code builds --------------------------------------------------


def test_vpt_head_is_kaiming_fan_out_with_the_prior_bias():
    head = head_copy(build("vpt", "vpt", num_classes=200))
    assert isinstance(head, nn.Linear)
    assert pytest.approx(-4.59512, abs=1e-5) == VPT_HEAD_BIAS
    assert torch.equal(head.bias.detach(), torch.full((200,), VPT_HEAD_BIAS))
    # kaiming_normal_(mode="fan_out") on an (out, in) weight: std sqrt(2 / out), here 0.1, not sqrt(2 / in) = 0.102.
    std = head.weight.detach().std().item()
    assert std == pytest.approx(math.sqrt(2 / 200), rel=0.03)
    big = head_copy(build("vpt", "vpt", num_classes=1000))
    assert big.weight.detach().std().item() == pytest.approx(math.sqrt(2 / 1000), rel=0.03)  # 0.045: fan-in 0.10


def test_adaptformer_head_is_a_batch_norm_without_affine_before_a_std_001_linear():
    head = head_copy(build("adaptformer", "adaptformer", num_classes=1000))
    assert isinstance(head, RecipeHead) and list(head.children()) == [head.before, head.linear]
    norm, linear = head.before, head.linear
    assert isinstance(norm, nn.BatchNorm1d) and not norm.affine and norm.eps == 1e-6
    assert norm.num_features == DIM and norm.track_running_stats and norm.momentum == 0.1
    assert isinstance(linear, nn.Linear) and (linear.out_features, linear.in_features) == (1000, DIM)
    assert linear.weight.detach().std().item() == pytest.approx(0.01, rel=0.02)
    # The script keeps nn.Linear's own bias init, U(-1/sqrt(in), 1/sqrt(in)), where timm's head has zeros.
    bound = 1 / math.sqrt(DIM)
    assert linear.bias.abs().max() <= bound and linear.bias.detach().std().item() == pytest.approx(
        bound / math.sqrt(3), rel=0.1)


def test_st_adapter_head_drops_half_before_a_std_002_linear():
    head = head_copy(build("st_adapter", "st_adapter", num_classes=1000))
    assert isinstance(head, RecipeHead) and list(head.children()) == [head.before, head.linear]
    assert isinstance(head.before, nn.Dropout) and head.before.p == 0.5
    assert head.linear.weight.detach().std().item() == pytest.approx(0.02, rel=0.02)
    assert torch.equal(head.linear.bias.detach(), torch.zeros(1000))


@pytest.mark.parametrize("method", ["vpt", "adaptformer", "st_adapter"])
def test_the_head_is_plain_by_default(method):
    model = video_model() if method == "st_adapter" else image_model()
    original = (model.vit if method == "st_adapter" else model).head
    weight, bias = original.weight.detach().clone(), original.bias.detach().clone()
    head = head_copy(vp.attach(model, method))
    assert type(head) is nn.Linear and vp.config(method).head == "plain"
    assert torch.equal(head.weight, weight) and torch.equal(head.bias, bias)


# --- the head follows the train/eval mode, the backbone stays in eval -----------------------------


def test_dropout_drops_in_training_and_not_at_evaluation():
    model = build("st_adapter", "st_adapter")
    linear = head_copy(model).linear
    x = inputs("st_adapter")
    set_train_mode(model, True)
    assert not model.vit.blocks.training and head_copy(model).before.training
    features, first = head_input(model, x)
    _, second = head_input(model, x)
    assert not torch.equal(first, second)  # a fresh mask per pass
    # What the linear saw: about half the features zeroed, the rest doubled.
    seen = []
    handle = linear.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    model(x)
    handle.remove()
    kept = seen[0] != 0
    assert 0.4 < kept.float().mean().item() < 0.6
    assert torch.allclose(seen[0][kept], 2 * features[kept], atol=1e-6)
    set_train_mode(model, False)
    assert not head_copy(model).before.training
    features_eval, out = head_input(model, x)
    assert torch.equal(features_eval, features)  # the backbone is in eval mode in both
    assert torch.allclose(out, linear(features), atol=1e-6)


def test_batch_norm_normalises_with_the_batch_in_training_and_running_stats_at_evaluation():
    model = build("adaptformer", "adaptformer")
    norm, linear = head_copy(model).before, head_copy(model).linear
    x = inputs("adaptformer", batch=16)
    set_train_mode(model, True)
    assert not model.blocks.training and norm.training
    features, out = head_input(model, x)
    mean, var = features.mean(0), features.var(0, unbiased=False)
    assert torch.allclose(out, linear((features - mean) / torch.sqrt(var + 1e-6)), atol=1e-4)
    # The running statistics moved by momentum 0.1 from (0, 1), with the unbiased variance, as BatchNorm does.
    assert torch.allclose(norm.running_mean, 0.1 * mean, atol=1e-6)
    assert torch.allclose(norm.running_var, 0.9 + 0.1 * features.var(0, unbiased=True), atol=1e-5)
    assert int(norm.num_batches_tracked) == 1
    set_train_mode(model, False)
    stats = norm.running_mean.clone(), norm.running_var.clone()
    features_eval, out_eval = head_input(model, x[:3])
    expected = linear((features_eval - stats[0]) / torch.sqrt(stats[1] + 1e-6))
    assert torch.allclose(out_eval, expected, atol=1e-5)
    assert torch.equal(norm.running_mean, stats[0]) and int(norm.num_batches_tracked) == 1  # eval updates nothing


# --- save, load, merge ----------------------------------------------------------------------------


def _train_a_little(model: nn.Module, method: str) -> None:
    """A few optimizer steps in training mode, so the weights and the running statistics move."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    set_train_mode(model, True)
    for step in range(3):
        loss = model(inputs(method, seed=step)).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    set_train_mode(model, False)


@pytest.mark.parametrize(("method", "head"), [("vpt", "vpt"), ("adaptformer", "adaptformer"),
                                              ("st_adapter", "st_adapter"), ("vpt", "adaptformer")])
def test_save_load_reproduces_the_recipe_head_bit_for_bit(method, head, tmp_path):
    model = build(method, head)
    _train_a_little(model, method)
    x = inputs(method, seed=9)
    with torch.no_grad():
        expected = model(x)
    vp.save(model, tmp_path / "adapter")
    torch.manual_seed(123)  # load attaches afresh: the saved tensors must replace that init, statistics too
    loaded = vp.load(video_model() if method == "st_adapter" else image_model(), tmp_path / "adapter")
    assert get_state(loaded).adapters["default"].method.config.head == head
    assert type(head_copy(loaded)) is type(head_copy(model))
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    for (name, a), (_, b) in zip(head_copy(model).state_dict().items(), head_copy(loaded).state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name
    if head == "adaptformer":
        assert int(head_copy(loaded).before.num_batches_tracked) == 3


def test_the_batch_norm_statistics_are_saved_with_the_adapter(tmp_path):
    from safetensors.torch import load_file

    model = build("adaptformer", "adaptformer")
    _train_a_little(model, "adaptformer")
    vp.save(model, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / "adapter.safetensors")
    norm = head_copy(model).before
    assert torch.equal(tensors["head.before.running_mean"], norm.running_mean)
    assert torch.equal(tensors["head.before.running_var"], norm.running_var)
    assert int(tensors["head.before.num_batches_tracked"]) == 3
    assert {"head.linear.weight", "head.linear.bias"} <= set(tensors)


def test_summary_counts_the_batch_norm_statistics_as_saved_not_trained():
    model = build("adaptformer", "adaptformer")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert vp.summary(model)["adapters"]["default"]["trainable"] == trained


@pytest.mark.parametrize("before", ["batch_norm", "dropout"])
def test_a_recipe_head_merges_into_one_linear(before):
    torch.manual_seed(0)
    linear = nn.Linear(DIM, 7)
    if before == "batch_norm":
        norm = nn.BatchNorm1d(DIM, affine=False, eps=1e-6)
        norm.train()
        norm(torch.randn(64, DIM) * 3 + 1)  # running statistics away from (0, 1)
        head = RecipeHead(norm, linear)
    else:
        head = RecipeHead(nn.Dropout(0.5), linear)
    head.eval()
    x = torch.randn(5, DIM) * 3 + 1
    merged = head.merged()
    assert type(merged) is nn.Linear
    assert torch.allclose(merged(x), head(x), atol=1e-5)


# --- the recipes select them ------------------------------------------------------------------------


def _run(method: dict, recipe: str | None) -> object:
    tree = {
        "task": "vit",
        "model": {"name": "vit_tiny_patch16_224", "pretrained": False},
        "method": method,
        "data": {"format": "vtab", "root": "unused"},
        "train": {"recipe": recipe} if recipe else {"epochs": 1},
    }
    return VitTask(parse_run_config(tree)).method_config()


@pytest.mark.parametrize(("method", "recipe", "head"), [
    ("vpt", "vpt", "vpt"),
    ("vpt", "noah", "plain"),
    ("vpt", None, "plain"),
    ("adaptformer", "adaptformer", "adaptformer"),
    ("adaptformer", "noah", "plain"),
    ("adaptformer", "vpt", "vpt"),  # VPT's code builds its head so for every transfer type
    ("st_adapter", "st_adapter", "st_adapter"),
    ("st_adapter", None, "plain"),
])
def test_a_papers_recipe_builds_its_head(method, recipe, head):
    assert _run({"name": method}, recipe).head == head


def test_a_head_the_user_gives_wins_over_the_recipe():
    assert _run({"name": "vpt", "head": "plain"}, "vpt").head == "plain"
    assert _run({"name": "vpt", "head": "st_adapter"}, None).head == "st_adapter"


def test_a_method_without_a_head_field_is_left_as_it_is():
    config = _run({"name": "linear"}, "vpt")
    assert not hasattr(config, "head")


def test_the_recipes_schedules():
    tree = {"task": "vit", "model": {"name": "vit_tiny_patch16_224"}, "method": {"name": "adaptformer"},
            "data": {"format": "vtab", "root": "unused"}, "train": {"recipe": "adaptformer"}}
    train = parse_run_config(tree).train
    assert (train.optimizer, train.lr, train.scale_lr, train.weight_decay, train.epochs, train.warmup_epochs) == (
        "sgd", 0.1, True, 0.0, 100, 20)
    tree = {**tree, "method": {"name": "st_adapter"}, "train": {"recipe": "st_adapter"}}
    train = parse_run_config(tree).train
    assert (train.optimizer, train.lr, train.scale_lr, train.weight_decay, train.epochs, train.warmup_epochs) == (
        "adamw", 1e-3, True, 0.01, 12, 2)


def test_a_mergeable_method_folds_its_recipe_head_on_merge():
    # No mergeable method declares `head` yet; give ia3's head copy the AdaptFormer recipe by hand.
    from visionpeft.vit.base import build_recipe_head

    model = vp.attach(image_model(), "ia3")
    model.head.copies["default"] = build_recipe_head(model.head.copies["default"], "adaptformer")
    _train_a_little(model, "ia3")
    x = inputs("ia3", seed=9)
    with torch.no_grad():
        expected = model(x)
    merged = vp.merge(model)
    assert type(merged.head) is nn.Linear
    assert set(merged.state_dict()) == set(image_model().state_dict())
    with torch.no_grad():
        assert torch.allclose(merged(x), expected, atol=1e-5)


def test_a_training_batch_of_one_through_the_batch_norm_head_is_a_clear_error():
    from visionpeft.errors import ConfigError

    model = build("adaptformer", "adaptformer")
    set_train_mode(model, True)
    with pytest.raises(ConfigError, match="train.drop_last"):
        model(inputs("adaptformer", batch=1))
