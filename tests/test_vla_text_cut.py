"""The text tower stops at the last end-of-text token: same features and gradients as all 77 positions.

Under CLIP's causal mask no position after a sequence's end token reaches it, so cutting the
sequences there changes only the rounding of the shorter matrix products (compared at 1e-5).
Towers where the later positions do matter (no causal mask, pooling that reads another position)
must keep the full length; they are compared bit for bit, which a cut would not pass.
"""

from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("open_clip")

import open_clip
import torch
import torch.nn.functional as F

import visionpeft as vp
from visionpeft.vla.text import encode_embeddings, sequence_length, text_tower

from tiny_models import TINY_CLIP_CFG, clip_tokenizer, tiny_clip, tiny_custom_text_clip

NAMES = ["dog", "golden_retriever", "cat", "sea_lion", "a very long class name with many words"]
FULL = 77
TEXTS = ["a photo of a dog.", "a photo of a golden retriever.", "X X X cat."]


def _images(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _three_layer_clip() -> open_clip.CLIP:
    """The tiny CLIP with 3 text and 3 vision blocks, so MaPLe can have deep prompts before blocks 1 and 2."""
    cfg = json.loads(json.dumps(TINY_CLIP_CFG))
    cfg["text_cfg"]["layers"] = cfg["vision_cfg"]["layers"] = 3
    torch.manual_seed(0)
    return open_clip.CLIP(**cfg).eval()


def _perturb(model: torch.nn.Module, scale: float = 0.3) -> None:
    """Move every learned tensor off its initialisation, so the check does not rest on an easy case."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen))


def _last_eot(tokens: torch.Tensor) -> int:
    return int(tokens.argmax(-1).max()) + 1


def _assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> None:
    error = float((actual - expected).norm() / expected.norm())
    assert error <= tol, f"relative error {error:.2e} > {tol}"


def _check_cut_against_full(params: dict[str, torch.Tensor], features) -> None:
    """``features(full_length)`` cut and at 77 positions: equal to 1e-5, and the gradients of ``params`` too."""
    weights = torch.randn(features(True).shape, generator=torch.Generator().manual_seed(2))
    results = []
    for full_length in (True, False):
        out = features(full_length)
        (out * weights).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in params.items()}))
        for p in params.values():
            p.grad = None
    (full, full_grads), (cut, cut_grads) = results
    torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)
    for name, grad in full_grads.items():
        assert grad.abs().sum() > 0, name
        _assert_relatively_close(cut_grads[name], grad)


class SeenLength:
    """Records the sequence length the text transformer's first block sees (batch-first ``(N, L, D)``)."""

    def __init__(self, clip: torch.nn.Module) -> None:
        self.lengths: list[int] = []
        block = text_tower(clip).transformer.resblocks[0]
        self._handle = block.register_forward_pre_hook(lambda module, args: self.lengths.append(args[0].shape[1]))

    def __enter__(self) -> SeenLength:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


# --- same features and gradients --------------------------------------------------------------------


@pytest.mark.parametrize(("position", "csc"), [("end", False), ("middle", False), ("front", False), ("end", True)])
def test_coop_cut_features_and_gradients_equal_full_length(position, csc):
    model = vp.attach(tiny_clip(0), "coop", classnames=NAMES, n_ctx=4, class_token_position=position, csc=csc)
    _perturb(model)
    learner = model.prompt_learner
    assert sequence_length(learner.tower, learner.tokenized_prompts) == _last_eot(learner.tokenized_prompts) < FULL
    _check_cut_against_full(
        {"ctx": learner.ctx},
        lambda full: encode_embeddings(learner.tower, learner(), learner.tokenized_prompts, full_length=full),
    )


@pytest.mark.parametrize("build", [tiny_clip, tiny_custom_text_clip], ids=["clip", "custom-text-clip"])
def test_cocoop_cut_features_and_gradients_equal_full_length(build):
    model = vp.attach(build(0).eval(), "cocoop", classnames=NAMES)
    _perturb(model, 0.05)
    learner = model.prompt_learner
    image_features = model.encode_images(_images(3))
    tokens = learner.tokenized_prompts.repeat(3, 1)

    def features(full_length: bool) -> torch.Tensor:
        prompts = learner(image_features).flatten(0, 1)
        return encode_embeddings(learner.tower, prompts, tokens, full_length=full_length)

    _check_cut_against_full(dict(learner.named_parameters()), features)


def test_maple_with_deep_prompts_cut_features_and_gradients_equal_full_length():
    model = vp.attach(_three_layer_clip(), "maple", classnames=NAMES, prompt_depth=3)
    _perturb(model)
    learner = model.prompt_learner
    assert len(learner.compound_prompts_text) == 2

    def features(full_length: bool) -> torch.Tensor:
        prompts, deep_text, _, _ = learner()
        return encode_embeddings(learner.tower, prompts, learner.tokenized_prompts, deep_text, learner.n_prompt,
                                 full_length=full_length)

    params = {"ctx": learner.ctx, **{f"deep{i}": p for i, p in enumerate(learner.compound_prompts_text)}}
    _check_cut_against_full(params, features)


def test_maple_logits_and_gradients_with_the_cut_equal_full_length(monkeypatch):
    """The whole MaPLe forward (both towers), so the cut text tower meets the vision prompts as before."""
    from visionpeft.vla import maple

    def full_length(*args, **kwargs):
        return encode_embeddings(*args, **{**kwargs, "full_length": True})

    logits, grads = [], []
    for full in (True, False):
        model = vp.attach(_three_layer_clip(), "maple", classnames=NAMES, prompt_depth=3)
        _perturb(model)
        with monkeypatch.context() as patch, SeenLength(model.clip) as seen:
            if full:
                patch.setattr(maple, "encode_embeddings", full_length)
            out = model(_images(2))
        assert (seen.lengths == [FULL]) == full
        out.logsumexp(-1).sum().backward()
        logits.append(out.detach())
        grads.append({n: p.grad.clone() for n, p in model.prompt_learner.named_parameters()})
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)
    for name, grad in grads[0].items():
        _assert_relatively_close(grads[1][name], grad)


@pytest.mark.parametrize("templates", [["a photo of a {}."], ["a photo of a {}.", "itap of my {} on a sunny day."]])
def test_zero_shot_cut_classifier_equals_encode_text(templates):
    clip = tiny_clip(0).eval()
    model = vp.attach(clip, "zeroshot", classnames=NAMES, templates=templates)
    with torch.no_grad(), SeenLength(clip) as seen:
        weights = model.prompt_learner.weights()
        per_template = [F.normalize(clip.encode_text(clip_tokenizer()([t.format(n.replace("_", " ")) for n in NAMES])),
                                    dim=-1) for t in templates]
    expected = per_template[0] if len(templates) == 1 else F.normalize(torch.stack(per_template).mean(0), dim=-1)
    torch.testing.assert_close(weights, expected, atol=1e-5, rtol=1e-5)
    assert seen.lengths[0] < FULL and seen.lengths[1:] == [FULL] * len(templates)  # ours, then encode_text's


def test_cocoop_batched_with_the_cut_equals_the_full_length_loop_with_gradients():
    """Batched and cut against the original's loop over all 77 positions: logits to 1e-5, gradients to 1e-5."""
    model = vp.attach(tiny_clip(0), "cocoop", classnames=NAMES, text_chunk_size=4)
    _perturb(model, 0.05)
    images = _images(3)
    results = []
    for forward in (model.forward_loop, model):
        with SeenLength(model.clip) as seen:
            out = forward(images)
        out.logsumexp(-1).sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.prompt_learner.named_parameters()},
                        set(seen.lengths)))
        model.zero_grad(set_to_none=True)
    (loop, loop_grads, loop_lengths), (batched, grads, lengths) = results
    assert loop_lengths == {FULL} and max(lengths) == _last_eot(model.prompt_learner.tokenized_prompts)
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-5)
    for name, grad in loop_grads.items():
        _assert_relatively_close(grads[name], grad)


# --- the transformer sees the cut length ------------------------------------------------------------


@pytest.mark.parametrize(("method", "kwargs"), [("coop", {"n_ctx": 4}), ("coop", {"class_token_position": "front"}),
                                                ("cocoop", {}), ("maple", {"prompt_depth": 2}), ("zeroshot", {})])
@pytest.mark.parametrize("grad", [False, True], ids=["eval", "train"])
def test_the_text_transformer_runs_only_up_to_the_last_end_token(method, kwargs, grad):
    clip = tiny_clip(0).eval()
    model = vp.attach(clip, method, classnames=NAMES, **kwargs)
    expected = _last_eot(clip_tokenizer()([f"a photo of a {n.replace('_', ' ')}." for n in NAMES]))
    if method != "zeroshot":
        expected = _last_eot(model.prompt_learner.tokenized_prompts)
    with torch.set_grad_enabled(grad), SeenLength(clip) as seen:
        model(_images(2))
    assert seen.lengths and set(seen.lengths) == {expected} and expected < FULL


def test_sequence_length_is_the_last_end_token_plus_one_for_argmax_and_eos_pooling():
    clip = tiny_clip(0)
    tokens = clip_tokenizer()(TEXTS)
    tower = text_tower(clip)
    assert sequence_length(tower, tokens) == int(tokens.argmax(-1).max()) + 1 == 9
    assert sequence_length(tower, tokens, full_length=True) == FULL
    clip.text_pool_type, clip.text_eos_id = "eos", 49407
    assert sequence_length(tower, tokens) == 9
    with torch.no_grad():
        torch.testing.assert_close(encode_embeddings(tower, tower.embed(tokens), tokens), clip.encode_text(tokens),
                                   atol=1e-5, rtol=1e-5)


# --- where the tower needs every position -------------------------------------------------------------


def _cut_by_hand(tower, tokens: torch.Tensor) -> torch.Tensor:
    """What a cut at the last end token would give: every position up to it, nothing after."""
    n = _last_eot(tokens)
    return encode_embeddings(tower, tower.embed(tokens)[:, :n], tokens[:, :n], full_length=True)


def _without_causal_mask(clip):
    if hasattr(clip, "text"):
        clip.text.attn_mask = None
    else:
        clip.attn_mask = None
    return clip


def _last_token_pooling(clip):
    if hasattr(clip, "text"):
        clip.text.pool_type = "last"
    else:
        clip.text_pool_type = "last"
    return clip


@pytest.mark.parametrize("build", [tiny_clip, tiny_custom_text_clip], ids=["clip", "custom-text-clip"])
@pytest.mark.parametrize("change", [_without_causal_mask, _last_token_pooling], ids=["no-causal-mask", "last-pooling"])
def test_towers_that_read_past_the_end_token_run_the_full_length(build, change):
    """Without a causal mask every position reaches the end token; "last" pooling reads position 76. A cut would
    change the features (checked: a cut by hand differs), so the result must be ``encode_text``'s bit for bit."""
    clip = change(copy.deepcopy(build(0).eval()))
    tower = text_tower(clip)
    tokens = clip_tokenizer()(TEXTS)
    with torch.no_grad(), SeenLength(clip) as seen:
        features = encode_embeddings(tower, tower.embed(tokens), tokens)
    assert seen.lengths == [FULL] and sequence_length(tower, tokens) == FULL
    with torch.no_grad():
        assert torch.equal(features, clip.encode_text(tokens))
        assert not torch.allclose(_cut_by_hand(tower, tokens), features, atol=1e-3)
