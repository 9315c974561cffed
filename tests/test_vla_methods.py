"""The vla methods against the originals' math, on tiny open_clip models built offline."""

from __future__ import annotations

import pytest

pytest.importorskip("open_clip")

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import visionpeft as vp
from visionpeft.errors import ConfigError, UnsupportedModelError
from visionpeft.vla.text import encode_embeddings, text_tower
from visionpeft.vla.vision import encode_image_with_prompts

from tiny_models import clip_tokenizer, tiny_clip, tiny_custom_text_clip, tiny_vit

NAMES = ["dog", "golden_retriever", "cat", "sea_lion"]
BUILDERS = [pytest.param(tiny_clip, id="clip"), pytest.param(tiny_custom_text_clip, id="custom-text-clip")]


def _images(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _zero_shot_logits(clip, names, images, template="a photo of a {}."):
    """Zero-shot CLIP computed directly with open_clip's encode_text / encode_image."""
    tokens = clip_tokenizer()([template.format(n.replace("_", " ")) for n in names])
    text = F.normalize(clip.encode_text(tokens).float(), dim=-1)
    image = F.normalize(clip.encode_image(images).float(), dim=-1)
    return clip.logit_scale.exp() * image @ text.T


@pytest.mark.parametrize("build", BUILDERS)
def test_embedding_path_equals_encode_text_exactly(build):
    """At full length the embedding path is ``encode_text`` bit for bit; cut at the last end token (the default)
    the transformer multiplies shorter matrices, whose sums may round differently in the last bits."""
    clip = build(0).eval()
    tokens = clip_tokenizer()(["a photo of a dog.", "a photo of a golden retriever.", "X X X cat."])
    tower = text_tower(clip)
    with torch.no_grad():
        expected = clip.encode_text(tokens)
        assert torch.equal(encode_embeddings(tower, tower.embed(tokens), tokens, full_length=True), expected)
        torch.testing.assert_close(encode_embeddings(tower, tower.embed(tokens), tokens), expected, atol=1e-5,
                                   rtol=1e-5)


@pytest.mark.parametrize("build", BUILDERS)
def test_coop_from_a_photo_of_a_equals_zero_shot_clip_exactly(build):
    """Bit for bit: CoOp's prompts against ``encode_text`` at full length, and CoOp against the zero-shot method
    (both stop at the same end token). open_clip's own 77-position logits agree to rounding (1e-5)."""
    clip = build(0).eval()
    images = _images()
    model = vp.attach(clip, "coop", classnames=NAMES, ctx_init="a photo of a")
    learner = model.prompt_learner
    assert learner.ctx.shape == (4, 48)
    with torch.no_grad():
        # On the attached (frozen) model: the same kernels as the prompt learner's forward.
        full = encode_embeddings(learner.tower, learner(), learner.tokenized_prompts, full_length=True)
        assert torch.equal(full, model.clip.encode_text(learner.tokenized_prompts))
        expected = _zero_shot_logits(model.clip, NAMES, images)
        coop = model(images)
        torch.testing.assert_close(coop, expected, atol=1e-5, rtol=1e-5)
        zeroshot = vp.attach(vp.detach(model), "zeroshot", classnames=NAMES)
        assert torch.equal(zeroshot(images), coop)


@pytest.mark.parametrize(("position", "text"), [("front", "{} a photo of a."), ("middle", "a photo {} of a.")])
def test_class_token_positions_assemble_the_right_sequence(position, text):
    clip = tiny_clip(0).eval()
    model = vp.attach(clip, "coop", classnames=NAMES, n_ctx=4, class_token_position=position)
    learner = model.prompt_learner
    tower = learner.tower
    words = clip_tokenizer()(["a photo of a"])
    with torch.no_grad():
        learner.ctx.copy_(tower.embed(words)[0, 1:5])
        expected_tokens = clip_tokenizer()([text.format(n.replace("_", " ")) for n in NAMES])
        assert torch.equal(learner(), tower.embed(expected_tokens))
        # The end-of-text token stays where pooling reads it.
        assert torch.equal(learner.tokenized_prompts.argmax(-1), expected_tokens.argmax(-1))


def test_class_specific_contexts_have_one_set_per_class():
    model = vp.attach(tiny_clip(0), "coop", classnames=NAMES, n_ctx=3, csc=True)
    assert model.prompt_learner.ctx.shape == (len(NAMES), 3, 48)
    assert vp.summary(model)["trainable"] == len(NAMES) * 3 * 48
    with torch.no_grad():
        model.prompt_learner.ctx[1].add_(1.0)
        prompts = model.prompt_learner()
    assert torch.equal(prompts[1, 1:4], model.prompt_learner.ctx[1]) and torch.equal(
        prompts[0, 1:4], model.prompt_learner.ctx[0])
    with pytest.raises(ConfigError, match="class-specific contexts were learned for 4 classes"):
        model.set_classnames(["a", "b"])


def test_random_context_init_is_normal_002():
    torch.manual_seed(0)
    model = vp.attach(tiny_clip(0), "coop", classnames=NAMES, n_ctx=16)
    ctx = model.prompt_learner.ctx
    assert ctx.shape == (16, 48) and ctx.dtype == torch.float32
    assert abs(ctx.std().item() - 0.02) < 0.003 and abs(ctx.mean().item()) < 0.003


@pytest.mark.parametrize("chunk", [1, 5, None, 1024])
def test_cocoop_batched_equals_the_per_image_loop(chunk):
    model = vp.attach(tiny_clip(0), "cocoop", classnames=NAMES, text_chunk_size=chunk)
    with torch.no_grad():
        for p in model.prompt_learner.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    images = _images(3)
    batched, loop = model(images), model.forward_loop(images)
    assert batched.shape == (3, len(NAMES))
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=1e-5)


def test_cocoop_checkpointed_chunks_give_the_same_gradients():
    grads = []
    for checkpoint in (False, True):
        model = vp.attach(tiny_clip(0), "cocoop", classnames=NAMES, text_chunk_size=3, checkpoint_chunks=checkpoint)
        model(_images(2)).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.prompt_learner.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_cocoop_meta_net_shifts_every_context_vector_per_image():
    model = vp.attach(tiny_clip(0), "cocoop", classnames=NAMES)
    learner = model.prompt_learner
    features = F.normalize(torch.randn(2, 64), dim=-1)
    prompts = learner(features)
    shift = learner.meta_net(features)
    for b in range(2):
        for c in range(len(NAMES)):
            torch.testing.assert_close(prompts[b, c, 1:5], learner.ctx + shift[b], atol=0, rtol=0)


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None)


def test_parameter_counts_on_vit_b16_match_the_papers(vit_b16):
    classes = ["a", "b", "c"]
    for method, kwargs, expected in (
        ("coop", {"n_ctx": 16}, 8_192),
        ("coop", {"ctx_init": "a photo of a"}, 2_048),
        ("cocoop", {}, 35_360),
        ("maple", {}, 3_555_072),
    ):
        model = vp.attach(vit_b16, method, classnames=classes, **kwargs)
        assert vp.summary(model)["trainable"] == expected, method
        vp.detach(model)


def test_saved_context_has_no_class_buffers_and_loads_for_other_classes(tmp_path):
    model = vp.attach(tiny_clip(0), "coop", classnames=NAMES, n_ctx=4)
    with torch.no_grad():
        model.prompt_learner.ctx.normal_(std=0.5)
    vp.save(model, tmp_path)
    assert set(load_file(tmp_path / "adapter.safetensors")) == {"prompt_learner.ctx"}
    other = ["tree", "car", "boat"]
    loaded = vp.load(tiny_clip(0), tmp_path)
    loaded.set_classnames(other)
    assert torch.equal(loaded.prompt_learner.ctx, model.prompt_learner.ctx)
    reference = vp.attach(tiny_clip(0), "coop", classnames=other, n_ctx=4)
    with torch.no_grad():
        reference.prompt_learner.ctx.copy_(model.prompt_learner.ctx)
        images = _images()
        assert loaded(images).shape == (3, 3)
        assert torch.equal(loaded(images), reference(images))


def test_vision_loop_without_prompts_equals_open_clip_visual():
    clip = tiny_clip(0).eval()
    images = _images()
    with torch.no_grad():
        assert torch.equal(encode_image_with_prompts(clip.visual, images), clip.visual(images))


def test_maple_depth_1_without_coupling_is_plain_text_prompting():
    clip = tiny_clip(0).eval()
    images = _images()
    maple = vp.attach(clip, "maple", classnames=NAMES, prompt_depth=1, coupling=False)
    assert vp.summary(maple)["trainable"] == 2 * 48
    with torch.no_grad():
        # encode_text runs all 77 positions, MaPLe stops at the end token: equal to rounding.
        torch.testing.assert_close(maple(images), _zero_shot_logits(maple.clip, NAMES, images), atol=1e-5, rtol=1e-5)
        maple.prompt_learner.ctx.normal_(std=0.3)
        expected_ctx = maple.prompt_learner.ctx.clone()
        out = maple(images)
    clip = vp.detach(maple)
    coop = vp.attach(clip, "coop", classnames=NAMES, ctx_init="a photo of a")
    with torch.no_grad():
        coop.prompt_learner.ctx[:2].copy_(expected_ctx)  # "of a" stays as MaPLe keeps it fixed
        assert torch.equal(coop(images), out)


def _three_layer_clip():
    cfg = {"embed_dim": 64, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "patch_size": 8, "head_width": 32},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 3}}
    torch.manual_seed(0)
    return open_clip.CLIP(**cfg).eval()


def test_maple_replaces_deep_prompts_at_layers_1_to_depth_minus_1():
    clip = _three_layer_clip()
    model = vp.attach(clip, "maple", classnames=NAMES, prompt_depth=2)
    learner = model.prompt_learner
    seen = {}

    def grab(name):
        def hook(module, args, kwargs, output=None):
            seen[name] = (args[0] if output is None else output).detach().clone()
        return hook

    text, vis = clip.transformer.resblocks, clip.visual.transformer.resblocks
    handles = [text[1].register_forward_pre_hook(grab("text_in1"), with_kwargs=True),
               text[1].register_forward_hook(grab("text_out1"), with_kwargs=True),
               text[2].register_forward_pre_hook(grab("text_in2"), with_kwargs=True),
               vis[0].register_forward_pre_hook(grab("vis_in0"), with_kwargs=True),
               vis[1].register_forward_pre_hook(grab("vis_in1"), with_kwargs=True),
               vis[1].register_forward_hook(grab("vis_out1"), with_kwargs=True),
               vis[2].register_forward_pre_hook(grab("vis_in2"), with_kwargs=True)]
    with torch.no_grad():
        model(_images(2))
    for h in handles:
        h.remove()
    _, deep_text, vision, deep_vision = learner()
    assert seen["vis_in0"].shape[1] == 17 + 2  # class token, 16 patches, 2 prompts appended at the end
    assert torch.equal(seen["text_in1"][:, 1:3], deep_text[0].unsqueeze(0).expand(len(NAMES), -1, -1))
    assert torch.equal(seen["vis_in1"][:, -2:], deep_vision[0].unsqueeze(0).expand(2, -1, -1))
    # Past the prompt depth the tokens are carried, not replaced.
    assert torch.equal(seen["text_in2"], seen["text_out1"]) and torch.equal(seen["vis_in2"], seen["vis_out1"])
    assert torch.equal(deep_vision[0], learner.compound_prompt_projections[0](learner.compound_prompts_text[0]))
    assert torch.equal(vision, learner.proj(learner.ctx))
    assert vp.summary(model)["trainable"] == 2 * 48 + (48 * 64 + 64) * 2 + 2 * 48


def test_maple_deeper_projections_start_as_clones_of_one_layer():
    model = vp.attach(_three_layer_clip(), "maple", classnames=NAMES, prompt_depth=3)
    first, second = model.prompt_learner.compound_prompt_projections
    assert torch.equal(first.weight, second.weight) and torch.equal(first.bias, second.bias)
    assert first.weight.data_ptr() != second.weight.data_ptr()
    assert not torch.equal(model.prompt_learner.proj.weight, first.weight)


def test_maple_honours_gradient_checkpointing():
    grads = []
    for checkpointing in (False, True):
        clip = tiny_clip(0).eval()
        clip.set_grad_checkpointing(checkpointing)
        model = vp.attach(clip, "maple", classnames=NAMES, prompt_depth=2)
        model(_images(2)).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.prompt_learner.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_bad_inputs_give_clear_errors():
    with pytest.raises(ConfigError, match="class list is empty"):
        vp.attach(tiny_clip(0), "coop", classnames=[])
    with pytest.raises(UnsupportedModelError, match="open_clip.CLIP"):
        vp.attach(tiny_vit(0), "coop", classnames=NAMES)
    with pytest.raises(ConfigError, match="prompt_depth"):
        vp.attach(tiny_clip(0), "maple", classnames=NAMES, prompt_depth=5)
    with pytest.raises(ConfigError, match="csc"):
        vp.config("coop", csc=True, ctx_init="a photo of a")
    with pytest.raises(ConfigError, match="fewer than n_ctx"):
        vp.attach(tiny_clip(0), "maple", classnames=NAMES, n_ctx=5, prompt_depth=1)
    with pytest.raises(ConfigError, match="exactly one"):
        vp.config("zeroshot", templates=["a photo"])
    text_cfg = {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 1}
    resnet = open_clip.CLIP(embed_dim=64, vision_cfg={"image_size": 32, "layers": [1, 1, 1, 1], "width": 16},
                            text_cfg=text_cfg).eval()
    assert vp.attach(resnet, "coop", classnames=NAMES)(_images(1)).shape == (1, len(NAMES))
    with pytest.raises(UnsupportedModelError, match="ViT image tower"):
        vp.attach(resnet, "maple", classnames=NAMES)


@pytest.mark.parametrize(("method", "kwargs"), [("coop", {}), ("cocoop", {}), ("maple", {"prompt_depth": 2}),
                                               ("zeroshot", {})])
def test_class_names_clip_reads_as_one_are_refused(method, kwargs):
    """open_clip's tokenizer lower-cases and '_' is a space in prompts: equal prompts, equal logits, argmax first."""
    tokenizer = clip_tokenizer()
    assert torch.equal(tokenizer(["a photo of a Cat."]), tokenizer(["a photo of a cat."]))
    with pytest.raises(ConfigError, match=rf"{method}\.classnames: 'Cat' \(class 0\) and 'cat' \(class 2\) are one "
                                          "class name to CLIP"):
        vp.attach(tiny_clip(0), method, classnames=["Cat", "dog", "cat"], **kwargs)
    model = vp.attach(tiny_clip(0), method, classnames=NAMES, **kwargs)
    with pytest.raises(ConfigError, match=r"'sea_lion' \(class 0\) and 'sea  lion' \(class 1\)"):
        model.set_classnames(["sea_lion", "sea  lion"])
    assert model.classnames == NAMES
    # Different texts that the tokenizer truncates to one prompt (77 tokens).
    with pytest.raises(ConfigError, match="give the same prompt tokens"):
        vp.attach(tiny_clip(0), method, classnames=["x " * 80 + "a", "x " * 80 + "b"], **kwargs)


def test_zero_shot_ensembles_average_normalised_template_features():
    clip = tiny_clip(0).eval()
    templates = ["a photo of a {}.", "a drawing of a {}."]
    model = vp.attach(clip, "zeroshot", classnames=NAMES, templates=templates)
    with torch.no_grad():
        per_template = [F.normalize(clip.encode_text(clip_tokenizer()([t.format(n.replace("_", " ")) for n in NAMES])),
                                    dim=-1) for t in templates]
    expected = F.normalize(torch.stack(per_template).mean(0), dim=-1)
    torch.testing.assert_close(model.prompt_learner.weights(), expected, atol=1e-6, rtol=1e-6)
    vp.detach(model)
    custom = vp.attach(clip, "zeroshot", classnames=NAMES, template_set="custom", dataset="EuroSAT")
    assert custom.prompt_learner.templates == ["a centered satellite photo of {}."]
    vp.detach(custom)
    assert len(vp.attach(clip, "zeroshot", classnames=NAMES, template_set="ensemble",
                         dataset="OxfordPets").prompt_learner.templates) == 8


def test_nearest_words_of_an_initialised_context_are_its_words():
    from visionpeft.vla.interpret import format_nearest_words, nearest_words

    model = vp.attach(tiny_clip(0), "coop", classnames=NAMES, ctx_init="a photo of a")
    records = nearest_words(model, k=2)
    assert [r["words"][0][0] for r in records] == ["a", "photo", "of", "a"]
    assert all(r["words"][0][1] == 0.0 for r in records)
    assert "ctx  2: photo (0.000)" in format_nearest_words(records)


@pytest.mark.parametrize(("method", "kwargs"), [("coop", {"class_token_position": "middle"}), ("cocoop", {}),
                                                ("maple", {"prompt_depth": 2})])
def test_low_precision_weights_keep_the_learned_tensors_fp32_and_trainable(method, kwargs):
    from open_clip.model import convert_weights_to_lp

    clip = tiny_clip(0).eval()
    convert_weights_to_lp(clip, torch.bfloat16)  # OpenAI-style: matmul weights in low precision
    model = vp.attach(clip, method, classnames=NAMES, **kwargs)
    logits = model(_images(2))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    for name, p in model.prompt_learner.named_parameters():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(p.requires_grad for p in model.clip.parameters())


def test_autocast_bf16_stays_close_to_fp32():
    fp32 = vp.attach(tiny_clip(0).eval(), "coop", classnames=NAMES, ctx_init="a photo of a")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = fp32(_images(2))
    torch.testing.assert_close(mixed.float(), fp32(_images(2)), atol=0.5, rtol=0.05)


def test_prompt_learning_refuses_tokenizers_without_clip_layout():
    class NoStartToken:
        """A tokenizer that does not begin prompts with its start token (as SigLIP's)."""

        sot_token_id = 49406

        def __call__(self, texts):
            tokens = clip_tokenizer()(texts)
            return torch.cat([tokens[:, 1:], torch.zeros(len(texts), 1, dtype=tokens.dtype)], dim=1)

    from visionpeft.vla.prompts import build_class_prompts

    clip = tiny_clip(0)
    with pytest.raises(UnsupportedModelError, match="start token"):
        build_class_prompts(text_tower(clip), NoStartToken(), "X X", NAMES, 2)


def test_quick_gelu_mismatch_is_explained():
    from visionpeft.vla.models import check_activation

    message = check_activation("ViT-B-16", "openai", {})
    assert message is not None and "ViT-B-16-quickgelu" in message and "force_quick_gelu" in message
    assert check_activation("ViT-B-16-quickgelu", "openai", {}) is None
    assert check_activation("ViT-B-16", "openai", {"force_quick_gelu": True}) is None
    assert check_activation("ViT-B-16", None, {}) is None


@pytest.mark.parametrize(("method", "kwargs"), [("coop", {"n_ctx": 4}), ("maple", {"prompt_depth": 2})])
def test_evaluation_encodes_the_class_prompts_once_and_never_serves_stale_features(method, kwargs):
    clip = tiny_clip(0).eval()
    model = vp.attach(clip, method, classnames=NAMES, **kwargs)
    calls = []
    hook = clip.ln_final.register_forward_hook(lambda *args: calls.append(1))
    images = _images(2)
    original = model.prompt_learner.ctx.detach().clone()
    with torch.no_grad():
        first = model(images)
        assert torch.equal(model(images), first) and len(calls) == 1  # the text tower ran once
        model.prompt_learner.ctx.add_(0.1)  # as an optimizer step
        changed = model(images)
        model.prompt_learner.ctx.data = original.clone()  # an edit autograd cannot see
        assert torch.equal(model(images), first)
        model.set_classnames(NAMES[:2])
        assert model(images).shape == (2, 2)
    assert len(calls) == 4 and not torch.equal(changed, first)
    model.set_classnames(NAMES)
    with_grad = model(images)  # with gradients: computed afresh (attention kernels may differ in the last bits)
    assert len(calls) == 5
    torch.testing.assert_close(with_grad.detach(), first, atol=1e-5, rtol=1e-5)
    hook.remove()
