"""Textual inversion on the tiny Stable Diffusion pipeline: what trains, what stays, what loads elsewhere."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

import visionpeft as vp
from visionpeft.errors import AdapterError, ConfigError, UnsupportedModelError
from visionpeft.method import get_state

pytest.importorskip("diffusers")


from visionpeft.diffusion import embedding_export
from visionpeft.diffusion.loss import diffusion_loss
from visionpeft.diffusion.models import StableDiffusionModel
from visionpeft.diffusion.textual_inversion import (
    NewTokenEmbedding,
    export_embeddings,
)

from test_diffusion_model import tiny_sdxl_model
from tiny_models import tiny_sd_components, tiny_sd_pipeline, tiny_sdxl_pipeline

TOKEN = "<cat-toy>"


def _model(seed: int = 0) -> StableDiffusionModel:
    return StableDiffusionModel.from_pipeline(tiny_sd_pipeline(seed))


def _attach(model: StableDiffusionModel, **kwargs) -> StableDiffusionModel:
    return vp.attach(model, "textual_inversion", placeholder_token=TOKEN, initializer_token="photo", **kwargs)


def _method(model):
    return get_state(model).adapters["default"].method


def _batch(model: StableDiffusionModel, prompt: str = f"a photo of {TOKEN}", size: int = 16) -> dict:
    """A fixed batch of two: random images in [-1, 1] and a prompt (the model's tokenize expands it)."""
    g = torch.Generator().manual_seed(11)
    pixels = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    return {"pixel_values": pixels, **model.tokenize([prompt, prompt])}


def _loss(model, batch) -> torch.Tensor:
    torch.manual_seed(5)  # the same noise, timesteps and VAE sample every call: a fixed batch
    return diffusion_loss(model, batch)


# --- attach, gradients, detach -----------------------------------------------------------------


def test_attach_adds_tokens_and_only_new_rows_train():
    model = _model()
    original_tokenizer = model.tokenizer
    vocab = len(original_tokenizer)
    base = model.text_encoder.get_input_embeddings()
    model = _attach(model, num_vectors=2)
    assert len(original_tokenizer) == vocab, "the user's tokenizer must not change"
    assert model.tokenizer is not original_tokenizer
    assert model.tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"]) == [vocab, vocab + 1]
    assert _method(model).token_ids(model) == {"tokenizer": [vocab, vocab + 1]}
    wrapper = model.text_encoder.get_input_embeddings()
    assert isinstance(wrapper, NewTokenEmbedding) and wrapper.base is base
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["text_encoder.embeddings.token_embedding.rows"]
    assert vp.summary(model)["trainable"] == 2 * base.embedding_dim
    photo = original_tokenizer.convert_tokens_to_ids("photo</w>")
    assert torch.equal(wrapper.rows.detach(), base.weight[photo].detach().repeat(2, 1))
    # The full matrix view puts the rows at their ids and keeps every other row.
    assert torch.equal(wrapper.weight[:vocab], base.weight) and torch.equal(wrapper.weight[vocab:], wrapper.rows)


def test_gradient_reaches_only_the_placeholder_rows():
    model = _attach(_model(), num_vectors=2)
    batch = _batch(model)
    assert (batch["input_ids"] == model.tokenizer.convert_tokens_to_ids(f"{TOKEN}_1")).any(), "prompt not expanded"
    _loss(model, batch).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert list(grads) == ["text_encoder.embeddings.token_embedding.rows"]
    rows_grad = grads["text_encoder.embeddings.token_embedding.rows"]
    assert rows_grad.shape == (2, 32) and bool((rows_grad.abs().sum(dim=1) > 0).all())


def test_rows_get_no_gradient_without_the_placeholder():
    model = _attach(_model())
    _loss(model, _batch(model, prompt="a photo of a cat")).backward()
    assert torch.equal(model.text_encoder.get_input_embeddings().rows.grad, torch.zeros(1, 32))


def test_output_without_the_placeholder_is_unchanged():
    model = _model().eval()
    batch = _batch(model, prompt="a photo of a cat")
    before = _loss(model, batch)
    assert torch.equal(_loss(_attach(model).eval(), batch), before)


def test_training_lowers_the_loss_and_keeps_the_vocabulary_bit_identical():
    from visionpeft.optim import build_optimizer
    from visionpeft.runconfig import TrainConfig

    model = _attach(_model(), num_vectors=2)
    embedding = model.text_encoder.get_input_embeddings()
    vocabulary = embedding.base.weight.detach().clone()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # Weight decay on every trained tensor (decay_all): it must not reach the rest of the vocabulary,
    # which is what diffusers' script needs its restore-after-each-step for (diffusers#507, #1176).
    train = TrainConfig(max_steps=6, lr=5e-3, weight_decay=1e-2, decay_all=True)
    optimizer = build_optimizer(model, train)
    batch = _batch(model)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = _loss(model, batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    losses.append(_loss(model, batch).item())
    assert all(after < before for before, after in itertools.pairwise(losses)), losses
    assert torch.equal(embedding.base.weight, vocabulary)
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name
    # Optimizer state exists for the new rows only: [2, 32] moments, nothing vocabulary-sized.
    state = optimizer.state
    assert [id(p) for p in state] == [id(embedding.rows)]
    assert state[embedding.rows]["exp_avg"].shape == (2, 32)


def test_detach_restores_embedding_tokenizer_and_state_dict():
    model = _model()
    reference = copy.deepcopy(model.state_dict())
    tokenizer, embedding = model.tokenizer, model.text_encoder.get_input_embeddings()
    model = _attach(model, num_vectors=3)
    with torch.no_grad():
        model.text_encoder.get_input_embeddings().rows.add_(1.0)
    restored = vp.detach(model)
    assert restored.tokenizer is tokenizer and restored.text_encoder.get_input_embeddings() is embedding
    state = restored.state_dict()
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], v) for k, v in reference.items())
    assert TOKEN not in restored.tokenizer.get_vocab()


def test_two_placeholders_on_one_model():
    model = _attach(_model())
    model = vp.attach(model, "textual_inversion", name="second", placeholder_token="<dog-toy>",
                      initializer_token="of")
    ids = model.tokenizer.convert_tokens_to_ids([TOKEN, "<dog-toy>"])
    assert ids == [519, 520]
    vectors = model.text_encoder.get_input_embeddings()(torch.tensor([ids]))[0]
    first = get_state(model).adapters["default"].method.vectors()["text_encoder"][0]
    second = get_state(model).adapters["second"].method.vectors()["text_encoder"][0]
    assert torch.equal(vectors[0], first) and torch.equal(vectors[1], second)
    vp.detach(model, "second")
    assert "<dog-toy>" not in model.tokenizer.get_vocab() and TOKEN in model.tokenizer.get_vocab()


# --- bad inputs ---------------------------------------------------------------------------------


def test_bad_inputs_fail_before_changing_the_model():
    model = _model()
    tokenizer, embedding = model.tokenizer, model.text_encoder.get_input_embeddings()
    with pytest.raises(ConfigError, match=r"'cat' is 3 tokens"):
        vp.attach(model, "textual_inversion", placeholder_token=TOKEN, initializer_token="cat")
    with pytest.raises(ConfigError, match="already in the tokenizer"):
        vp.attach(model, "textual_inversion", placeholder_token="photo</w>", initializer_token="photo")
    with pytest.raises(ConfigError, match="one word"):
        vp.config("textual_inversion", placeholder_token="<two words>")
    with pytest.raises(ConfigError, match="one word"):
        vp.config("textual_inversion", initializer_token="")
    with pytest.raises(ConfigError, match="num_vectors"):
        vp.config("textual_inversion", num_vectors=0)
    assert model.tokenizer is tokenizer and model.text_encoder.get_input_embeddings() is embedding
    assert get_state(model) is None
    model = _attach(model)
    # The same placeholder again, or a multi-vector one whose `_1` token exists, is refused.
    with pytest.raises(ConfigError, match="already in the tokenizer"):
        vp.attach(model, "textual_inversion", name="again", placeholder_token=TOKEN, initializer_token="photo")
    model.tokenizer.add_tokens(["<p>_1"])
    with pytest.raises(ConfigError, match=r"\['<p>_1'\] already in the tokenizer"):
        vp.attach(model, "textual_inversion", name="again", placeholder_token="<p>", initializer_token="photo",
                  num_vectors=2)
    assert list(get_state(model).adapters) == ["default"]


def test_unknown_initializer_word():
    from transformers import CLIPTokenizer

    from tiny_models import TINY_MERGES, _tiny_clip_vocab

    with pytest.raises(ConfigError, match="'qzxv' is 4 tokens"):
        vp.attach(_model(), "textual_inversion", placeholder_token=TOKEN, initializer_token="qzxv")
    # Byte-level BPE spells any word; a vocabulary without "q</w>" maps the word "q" to the unknown token.
    vocab = [t for t in _tiny_clip_vocab() if t != "q</w>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, model_max_length=77,
                              merges=[tuple(m.split(" ")) for m in TINY_MERGES])
    c = tiny_sd_components()
    model = StableDiffusionModel(c["unet"], c["vae"], c["text_encoder"], tokenizer, c["scheduler"])
    with pytest.raises(ConfigError, match="'q' is not in the tokenizer"):
        vp.attach(model, "textual_inversion", placeholder_token=TOKEN, initializer_token="q")


def test_a_placeholder_that_is_a_vocabulary_word_is_refused():
    """'photo' is 'photo</w>' in the vocabulary: added as a token it would take the word over in every prompt."""
    model = _model()
    tokenizer = model.tokenizer
    for word, piece in (("photo", "photo</w>"), ("Photo", "photo</w>"), ("of", "of</w>")):
        with pytest.raises(ConfigError, match=rf"textual_inversion\.placeholder_token: '{word}' is the word "
                                              rf"'{piece}' of the tokenizer .*'<{word}>'"):
            vp.attach(model, "textual_inversion", placeholder_token=word, initializer_token="photo")
    assert model.tokenizer is tokenizer and get_state(model) is None


def test_sdxl_placeholder_must_be_new_in_the_second_tokenizer_too():
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    # A second tokenizer whose vocabulary has the word "toy</w>", which the first spells in three pieces.
    symbols = sorted(ByteLevel.alphabet())
    vocab = [*symbols, *(s + "</w>" for s in symbols), "to", "toy</w>", "<|startoftext|>", "<|endoftext|>"]
    model = tiny_sdxl_model()
    model.tokenizer_2 = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[("t", "o"), ("to", "y</w>")],
                                      model_max_length=77)
    assert len(model.tokenizer.encode("toy", add_special_tokens=False)) == 3
    with pytest.raises(ConfigError, match=r"'toy' is the word 'toy</w>' of the tokenizer_2 .*'<toy>'"):
        vp.attach(model, "textual_inversion", placeholder_token="toy", initializer_token="a")
    assert get_state(model) is None and "toy" not in model.tokenizer.get_vocab()


def test_prompts_without_the_placeholder_are_refused_before_training():
    """Vectors no training prompt uses get no gradient; class prompts with them would teach the whole class."""
    model = _attach(_model())
    method = _method(model)
    method.check_prompts(model, ["a photo of a cat", f"a photo of {TOKEN}"], "data.instance_prompt")
    method.check_prompts(model, [f"a photo of a {TOKEN.upper()}"], "data.instance_prompt", ["a photo of a toy"])
    with pytest.raises(ConfigError, match=rf"method\.placeholder_token: '{TOKEN}' is in none of the 3 training "
                                          r"prompts \(the captions\), e\.g\. 'a photo of a cat'"):
        method.check_prompts(model, ["a photo of a cat", "a dog", "a photo of a cat"], "the captions")
    # Past the tokenizer's 77 tokens the placeholder is cut off: the text encoder never sees it.
    with pytest.raises(ConfigError, match="in none of the 1 training prompts"):
        method.check_prompts(model, ["x " * 80 + TOKEN], "the captions")
    with pytest.raises(ConfigError, match=rf"'{TOKEN}' is in the class prompt 'a photo of a {TOKEN} toy'"):
        method.check_prompts(model, [f"a photo of {TOKEN}"], "data.instance_prompt", [f"a photo of a {TOKEN} toy"])
    sdxl = _attach(tiny_sdxl_model())
    assert set(_method(sdxl).token_ids(sdxl)) == {"tokenizer", "tokenizer_2"}
    _method(sdxl).check_prompts(sdxl, [f"a photo of {TOKEN}"], "data.instance_prompt")
    with pytest.raises(ConfigError, match="in none of the 1 training prompts"):
        _method(sdxl).check_prompts(sdxl, ["a photo of a cat"], "data.instance_prompt")


def test_other_models_are_refused():
    from torch import nn

    with pytest.raises(UnsupportedModelError, match="diffusers.StableDiffusion"):
        vp.attach(nn.Linear(2, 2), "textual_inversion")


# --- exports that other tools load --------------------------------------------------------------


def _trained(num_vectors: int = 2) -> StableDiffusionModel:
    model = _attach(_model(), num_vectors=num_vectors)
    with torch.no_grad():  # move the rows away from the initializer, as training does
        rows = model.text_encoder.get_input_embeddings().rows
        rows.add_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(3)))
    return model.eval()


def _check_loaded(pipe, model, prompt: str, token_ids: list[int]) -> None:
    learned = _method(model).vectors()["text_encoder"]
    rows = pipe.text_encoder.get_input_embeddings().weight[token_ids]
    assert torch.equal(rows, learned)
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length",
                         max_length=77, return_tensors="pt").input_ids
    expected_ids = model.tokenize(prompt)["input_ids"]
    assert torch.equal(ids, expected_ids)
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids)[0], model.encode_prompt(expected_ids)[0])


def test_exports_load_through_load_textual_inversion(tmp_path):
    model = _trained(num_vectors=2)
    files = export_embeddings(model, tmp_path, step=6)
    assert sorted(p.name for p in files) == ["cat-toy.pt", "cat-toy.safetensors", "learned_embeds.safetensors"]
    prompt = f"a photo of {TOKEN}"
    ids = [519, 520]

    pipe = tiny_sd_pipeline()
    pipe.load_textual_inversion(tmp_path)  # the folder: diffusers' learned_embeds.safetensors
    _check_loaded(pipe, model, prompt, ids)

    pipe = tiny_sd_pipeline()
    pipe.load_textual_inversion(tmp_path / "cat-toy.pt")  # A1111: the token is the file's "name"
    _check_loaded(pipe, model, prompt, ids)

    pipe = tiny_sd_pipeline()
    pipe.load_textual_inversion(tmp_path / "cat-toy.safetensors", token=TOKEN)  # kohya / A1111 emb_params
    _check_loaded(pipe, model, prompt, ids)

    pt = torch.load(tmp_path / "cat-toy.pt", weights_only=True)
    assert set(pt) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint", "sd_checkpoint_name"}
    assert pt["string_to_token"] == {"*": 265} and pt["name"] == TOKEN and pt["step"] == 6
    assert list(pt["string_to_param"]) == ["*"] and pt["string_to_param"]["*"].shape == (2, 32)


def test_single_vector_export_and_the_pipeline_over_the_model(tmp_path):
    model = _trained(num_vectors=1)
    export_embeddings(model, tmp_path)
    pipe = tiny_sd_pipeline()
    pipe.load_textual_inversion(tmp_path)
    _check_loaded(pipe, model, f"{TOKEN} on a table", [519])
    # The model's own pipeline (shared modules, extended tokenizer) generates with the placeholder.
    images = model.to_pipeline()(f"a {TOKEN}", num_inference_steps=2, height=32, width=32, output_type="np",
                                 generator=torch.Generator().manual_seed(0)).images
    loaded = pipe(f"a {TOKEN}", num_inference_steps=2, height=32, width=32, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3)
    assert (images == loaded).all()


def test_export_needs_an_adapter(tmp_path):
    with pytest.raises(AdapterError, match="no textual_inversion adapter"):
        export_embeddings(_model(), tmp_path)


def test_file_stem():
    assert embedding_export.file_stem("<cat-toy>") == "cat-toy"
    assert embedding_export.file_stem("<>") == "embedding"
    assert embedding_export.file_stem("my_style.v2") == "my_style.v2"


# --- SDXL: one vector set per text encoder -----------------------------------------------------


def test_sdxl_trains_both_encoders_and_exports_clip_l_clip_g(tmp_path):
    model = _attach(tiny_sdxl_model(), num_vectors=2)
    method = _method(model)
    assert set(method.trained_tensors(model)) == {"text_encoder", "text_encoder_2"}
    assert method.token_ids(model) == {"tokenizer": [519, 520], "tokenizer_2": [519, 520]}
    prompt = f"a photo of {TOKEN}"
    batch = model.tokenize(prompt)
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    model(latents, torch.tensor([500]), batch["input_ids"], batch["input_ids_2"]).square().mean().backward()
    trained = {id(t) for t in method.trained_tensors(model).values()}
    assert {id(p) for p in model.parameters() if p.grad is not None} == trained and len(trained) == 2
    with torch.no_grad():
        for rows in method.trained_tensors(model).values():
            rows.add_(torch.randn(rows.shape, generator=torch.Generator().manual_seed(1)))

    files = export_embeddings(model, tmp_path)
    assert sorted(p.name for p in files) == [
        "cat-toy.safetensors", "learned_embeds.safetensors", "learned_embeds_2.safetensors"
    ]
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "cat-toy.safetensors")) == {"clip_l", "clip_g"}
    vectors = method.vectors()

    def check(pipe):
        for encoder, tokenizer, key in ((pipe.text_encoder, pipe.tokenizer, "text_encoder"),
                                        (pipe.text_encoder_2, pipe.tokenizer_2, "text_encoder_2")):
            assert tokenizer.convert_tokens_to_ids([TOKEN, f"{TOKEN}_1"]) == [519, 520]
            assert torch.equal(encoder.get_input_embeddings().weight[519:521], vectors[key])
        with torch.no_grad():
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
            expected, expected_pooled = model.encode_prompt(batch["input_ids"], batch["input_ids_2"])
        assert torch.equal(embeds, expected) and torch.equal(pooled, expected_pooled)

    pipe = tiny_sdxl_pipeline()
    embedding_export.load_sdxl_embedding(pipe, tmp_path / "cat-toy.safetensors", TOKEN)
    check(pipe)
    # diffusers' own pair of files, one call per encoder as textual_inversion_sdxl.py's README loads them
    pipe = tiny_sdxl_pipeline()
    pipe.load_textual_inversion(tmp_path, weight_name="learned_embeds.safetensors")
    pipe.load_textual_inversion(tmp_path, weight_name="learned_embeds_2.safetensors",
                                text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    check(pipe)


def test_sdxl_initializer_must_be_one_token_in_both_tokenizers():
    model = tiny_sdxl_model()
    model.tokenizer_2 = copy.deepcopy(model.tokenizer_2)
    model.tokenizer_2.add_tokens(["<x>"])  # a token the first tokenizer splits
    with pytest.raises(ConfigError, match="tokenizer "):
        vp.attach(model, "textual_inversion", placeholder_token=TOKEN, initializer_token="<x>")
    assert get_state(model) is None
