"""Training-step cost of the diffusion methods next to the approaches of diffusers' example scripts.

    python benchmarks/diffusion_speed.py                  # CPU: tiny + SD 1.5 (16x16 latents), 1 thread
    python benchmarks/diffusion_speed.py --quick          # tiny pipeline only
    python benchmarks/diffusion_speed.py --archs sd15 --groups lora --full-unet   # + LoRA / full UNet (~20 GB)
    python benchmarks/diffusion_speed.py --device cuda --latent 64 --batch 4   # SD 1.5 at 512 px on a GPU

Groups, each measured in one run on the same (seeded) weights and batch:

- ``textual_inversion``: visionpeft's (only the new vectors are a parameter; AdamW over them) against
  diffusers' ``textual_inversion.py`` (``resize_token_embeddings``, AdamW over the whole
  ``token_embedding.weight``, the other rows copied back after every step).
- ``lora``: ``vp.attach(model, "lora")`` (fast path on, and off: peft's layer forward) against
  ``unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k",
  "to_q", "to_v", "to_out.0"]))`` as in ``train_text_to_image_lora.py``; all train the same 4-rank updates.
- ``t2i_adapter``: visionpeft's (frozen UNet) against ``train_t2i_adapter_sdxl.py``'s setting, where
  the UNet is left trainable (``requires_grad``) although only the adapter is optimised, so its
  gradients are computed and accumulate.
- ``full_unet`` (only with ``--full-unet``): our LoRA against fine-tuning the whole UNet with AdamW
  (SD 1.5 on CPU: about 14 GB for that process alone).

Architectures: the tiny test pipeline (``tests/tiny_models.py``), and SD 1.5's UNet
(320/640/1280/1280, cross-attention 768) with a CLIP ViT-L/14 text encoder (12 layers, width 768,
CLIP's 49,408-token BPE vocabulary from open_clip's bundled file), random weights (speed does not
depend on them). The latents are given (as with cached latents), so the VAE is a small stand-in
with SD's scale factor 8 that no step runs. A step is the whole optimizer step: the denoising loss
of one batch (visionpeft's through :func:`visionpeft.diffusion.loss.diffusion_loss`, the
reference's written as the scripts write it), backward, AdamW (weight decay 1e-2, the scripts'
default) and, for the reference textual inversion, its row restore.

Each contender runs in its own process holding its own pipeline (``benchmarks/harness.py``): CPU
seconds of a single-threaded process (CUDA events on CUDA), interleaved rounds with the order
rotated, the median of per-round ratios and the ratio of minima, and each process's peak resident
memory (on CUDA the allocator's peak), with the bytes of optimizer state and gradients a step
leaves. With SD 1.5 on CPU at most ``--max-procs`` (2) processes live at once: a larger group runs
as pairs.
"""


from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from harness import Contender, add_common_args, compare, describe, fmt_count, mib, ratios, resolve_device, table
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
PLACEHOLDER = "<concept>"
LR = 1e-4
WEIGHT_DECAY = 1e-2  # AdamW weight decay of diffusers' scripts (--adam_weight_decay)

#: SD 1.5's UNet (stable-diffusion-v1-5/unet/config.json), the keys that differ from the class defaults
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "block_out_channels": (320, 640, 1280, 1280),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "layers_per_block": 2,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
#: CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14 text_config), SD 1.x's text encoder
VIT_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}


# --- models -------------------------------------------------------------------------------------


def clip_tokenizer() -> Any:
    """CLIP's real BPE tokenizer (49,408 tokens) as a transformers ``CLIPTokenizer``, offline.

    Built from the vocabulary open_clip bundles; ids equal OpenAI's (``photo`` is 1125).
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    vocab = dict(simple.encoder)
    for name, index in (("<|startoftext|>", 49406), ("<|endoftext|>", 49407)):
        old = next(k for k, v in vocab.items() if v == index)
        vocab[name] = vocab.pop(old)
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def parts(arch: str) -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer and scheduler of ``arch`` (``tiny`` or ``sd15``), random weights."""
    if arch == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import tiny_sd_components

        return tiny_sd_components(0)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    text_encoder = CLIPTextModel(CLIPTextConfig(**VIT_L_TEXT)).eval()
    # Four levels give SD's scale factor 8; the latents are given, so no step runs the VAE.
    vae = AutoencoderKL(block_out_channels=(32, 32, 32, 32), down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=32)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, steps_offset=1)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": clip_tokenizer(),
            "scheduler": scheduler}


def container(p: dict[str, Any], **replace: Any) -> nn.Module:
    """A :class:`StableDiffusionModel` over the parts (some replaced)."""
    from visionpeft.diffusion.models import StableDiffusionModel

    p = {**p, **replace}
    return StableDiffusionModel(p["unet"], p["vae"], p["text_encoder"], p["tokenizer"], p["scheduler"])


# --- one optimizer step (in the contender's process) ---------------------------------------------


class Batch:
    """The fixed batch of a group: cached-latent posteriors, prompts and condition images."""

    def __init__(self, batch: int, latent: int, vae_scale: int, device: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.latent_dist = torch.randn(batch, 8, latent, latent, generator=g).to(device)
        self.condition = torch.rand(batch, 3, latent * vae_scale, latent * vae_scale, generator=g).to(device)
        self.size = batch


def reference_loss(text_encoder: nn.Module, unet: nn.Module, scheduler: Any, ids: torch.Tensor, batch: Batch,
                   adapter: nn.Module | None = None) -> torch.Tensor:
    """The denoising loss as diffusers' scripts compute it (epsilon target, plain MSE)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(batch.latent_dist).sample() * 0.18215
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    hidden = text_encoder(ids)[0]
    extra = {}
    if adapter is not None:
        extra["down_intrablock_additional_residuals"] = adapter(batch.condition)
    pred = unet(noisy, timesteps, hidden, **extra).sample
    return F.mse_loss(pred.float(), noise.float())


def ours_loss(model: nn.Module, ids: torch.Tensor, batch: Batch, condition: bool = False) -> torch.Tensor:
    """visionpeft's training loss of the batch (the task's own loss function)."""
    from visionpeft.diffusion.loss import diffusion_loss

    data = {"latent_dist": batch.latent_dist, "input_ids": ids}
    if condition:
        data["condition"] = batch.condition
    return diffusion_loss(model, data)


def tensor_bytes(tensors) -> int:
    """Total bytes of ``tensors`` (``None`` entries skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Step:
    """One training configuration: a loss closure, the parameters AdamW optimises, an after-step hook.

    After every call ``info`` holds the bytes of optimizer state and of the gradients of the
    ``watched`` parameters the step left (the harness hands ``info`` back after the last step).
    """

    def __init__(self, loss: Callable[[], torch.Tensor], params: list[nn.Parameter], watched: list[nn.Parameter],
                 after: Callable[[], None] | None = None) -> None:
        self.loss, self.params, self.watched, self.after = loss, params, watched, after
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.info: dict[str, Any] = {"trainable": sum(p.numel() for p in params)}

    def __call__(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()
        self.info["grad_bytes"] = tensor_bytes(p.grad for p in self.watched)
        self.info["state_bytes"] = tensor_bytes(t for s in self.optimizer.state.values() for t in s.values()
                                                if torch.is_tensor(t) and t.dim() > 0)
        if self.after is not None:
            self.after()


def setup(arch: str, batch_size: int, latent: int, device: str) -> tuple[dict[str, Any], Batch]:
    """The parts of ``arch`` on ``device`` and the fixed batch (tiny: batch 2, 16x16 latents, VAE scale 2)."""
    p = parts(arch)
    p = {k: (v.to(device) if isinstance(v, nn.Module) else v) for k, v in p.items()}
    batch = Batch(2, 16, 2, device) if arch == "tiny" else Batch(batch_size, latent, 8, device)
    torch.manual_seed(0)
    return p, batch


def ours(model: nn.Module, batch: Batch, condition: bool = False, prompt: str = "a photo of a cat") -> Step:
    """The training step of the visionpeft method attached to ``model``."""
    from visionpeft.method import set_train_mode

    set_train_mode(model, True)
    ids = model.tokenize([prompt] * batch.size)["input_ids"].to(batch.latent_dist.device)
    step = Step(lambda: ours_loss(model, ids, batch, condition), [q for q in model.parameters() if q.requires_grad],
                list(model.parameters()))
    step.info["input_ids"] = ids[0].tolist()
    return step


TI_PROMPT = f"a photo of {PLACEHOLDER}"
PROMPT = "a photo of a cat"


def ti_ours(p: dict[str, Any], batch: Batch) -> Step:
    """visionpeft's textual inversion: only the new token's vector is a parameter."""
    import visionpeft as vp

    model = vp.attach(container(p), "textual_inversion", placeholder_token=PLACEHOLDER, initializer_token="photo")
    return ours(model, batch, prompt=TI_PROMPT)


def ti_reference(p: dict[str, Any], batch: Batch) -> Step:
    """diffusers' ``textual_inversion.py``: add the token, resize the embedding, train the whole matrix."""
    scheduler = container(p).noise_scheduler  # first: the container freezes the text encoder
    tokenizer, text_encoder = p["tokenizer"], p["text_encoder"]
    device = batch.latent_dist.device
    tokenizer.add_tokens([PLACEHOLDER])
    init_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize("photo"))[0]
    new_id = tokenizer.convert_tokens_to_ids(PLACEHOLDER)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embedding = text_encoder.get_input_embeddings()
    with torch.no_grad():
        embedding.weight[new_id] = embedding.weight[init_id].clone()
    text_encoder.requires_grad_(False)
    embedding.weight.requires_grad_(True)
    text_encoder.train()
    originals = embedding.weight.detach().clone()
    keep = torch.ones(len(tokenizer), dtype=torch.bool, device=device)
    keep[new_id] = False
    ids = tokenizer([TI_PROMPT] * batch.size, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt").input_ids.to(device)
    unet = p["unet"].requires_grad_(False)

    def restore() -> None:
        with torch.no_grad():
            embedding.weight[keep] = originals[keep]

    step = Step(lambda: reference_loss(text_encoder, unet, scheduler, ids, batch), list(embedding.parameters()),
                list(text_encoder.parameters()) + list(unet.parameters()), after=restore)
    step.info["input_ids"] = ids[0].tolist()
    return step


def lora_ours(p: dict[str, Any], batch: Batch, fast: bool = True) -> Step:
    """``vp.attach(model, "lora")`` with diffusers' rank, scale and init; visionpeft's fast path on or off."""
    import visionpeft as vp

    model = vp.attach(container(p), "lora", r=4, alpha=4, init="gaussian")
    step = ours(model, batch)
    step.info["lora"] = set_fast_lora(model, fast)
    return step


def set_fast_lora(model: nn.Module, enabled: bool) -> str:
    """Turn visionpeft's fast LoRA path on or off; says how many layers have it."""
    from visionpeft.generic import lora, lora_fast

    lora.set_fast_path(model, enabled)
    count = sum(map(lora_fast.is_fast, model.modules()))
    return f"fast path {'on' if enabled else 'off'} ({count} fast layers)"


def lora_fast_off(p: dict[str, Any], batch: Batch) -> Step:
    """Our LoRA with peft's own layer forward."""
    return lora_ours(p, batch, fast=False)


def lora_reference(p: dict[str, Any], batch: Batch) -> Step:
    """``unet.add_adapter(LoraConfig(...))`` as in ``train_text_to_image_lora.py``."""
    from peft import LoraConfig

    unet = p["unet"].requires_grad_(False)
    p["text_encoder"].requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    unet.train()
    model = container(p)
    ids = model.tokenize([PROMPT] * batch.size)["input_ids"].to(batch.latent_dist.device)
    return Step(lambda: reference_loss(p["text_encoder"], unet, model.noise_scheduler, ids, batch),
                [q for q in unet.parameters() if q.requires_grad], list(unet.parameters()))


def full_unet(p: dict[str, Any], batch: Batch) -> Step:
    """Fine-tuning the whole UNet (text encoder frozen), AdamW over all its parameters."""
    unet = p["unet"].requires_grad_(True)
    p["text_encoder"].requires_grad_(False)
    unet.train()
    model = container(p)
    ids = model.tokenize([PROMPT] * batch.size)["input_ids"].to(batch.latent_dist.device)
    return Step(lambda: reference_loss(p["text_encoder"], unet, model.noise_scheduler, ids, batch),
                list(unet.parameters()), list(unet.parameters()))


def t2i_ours(p: dict[str, Any], batch: Batch) -> Step:
    """visionpeft's T2I-Adapter: the UNet frozen, only the adapter trained."""
    import visionpeft as vp

    return ours(vp.attach(container(p), "t2i_adapter"), batch, condition=True)


def t2i_reference(p: dict[str, Any], batch: Batch) -> Step:
    """``train_t2i_adapter_sdxl.py``'s setting: the same adapter optimised, the UNet left ``requires_grad``.

    The script never freezes the UNet (diffusers#5403), so every step computes its weight gradients,
    which accumulate (they are in no optimizer, ``zero_grad`` does not clear them).
    """
    from diffusers import T2IAdapter

    import visionpeft as vp
    from visionpeft.method import get_state

    model = vp.attach(container(p), "t2i_adapter")  # for the adapter arguments and weights ours has
    kwargs = dict(get_state(model).adapters["default"].method.adapter_kwargs)
    state = {k: v.detach().clone() for k, v in model.t2i_adapter.state_dict().items()}
    model = vp.detach(model)
    adapter = T2IAdapter(**kwargs).to(batch.latent_dist.device)
    adapter.load_state_dict(state)
    adapter.train()
    unet = model.unet.requires_grad_(True)
    unet.train()
    model.text_encoder.requires_grad_(False)
    ids = model.tokenize([PROMPT] * batch.size)["input_ids"].to(batch.latent_dist.device)
    return Step(lambda: reference_loss(model.text_encoder, unet, model.noise_scheduler, ids, batch, adapter),
                list(adapter.parameters()), list(adapter.parameters()) + list(unet.parameters()))


#: contender name → its step builder
BUILDERS: dict[str, Callable[[dict[str, Any], Batch], Step]] = {
    "textual_inversion": ti_ours,
    "textual_inversion (diffusers)": ti_reference,
    "lora": lora_ours,
    "lora (fast path off)": lora_fast_off,
    "lora (unet.add_adapter)": lora_reference,
    "t2i_adapter": t2i_ours,
    "t2i_adapter (UNet not frozen)": t2i_reference,
    "full unet": full_unet,
}


def build(name: str, arch: str, batch_size: int, latent: int, device: str) -> tuple[Callable[[], None], dict]:
    """Contender ``name``'s step on ``arch`` (in its own process) and its info dict."""
    p, batch = setup(arch, batch_size, latent, device)
    step = BUILDERS[name](p, batch)
    return step, step.info


# --- groups and the report (in the parent) ------------------------------------------------------


@dataclasses.dataclass
class Group:
    """Contenders measured side by side, the reference of their ratios, and how to split them in pairs."""

    names: list[str]
    reference: str
    pairs: list[tuple[str, str]]  # (contender, its reference) when fewer processes may live at once
    target: tuple[str, Callable[[float], bool]] | None = None  # (label, test) of names[0] / reference


GROUPS: dict[str, Group] = {
    "textual_inversion": Group(["textual_inversion", "textual_inversion (diffusers)"], "textual_inversion (diffusers)",
                               [("textual_inversion", "textual_inversion (diffusers)")],
                               ("<= 0.90x", lambda x: x <= 0.90)),
    "lora": Group(["lora", "lora (fast path off)", "lora (unet.add_adapter)"], "lora (unet.add_adapter)",
                  [("lora", "lora (unet.add_adapter)"), ("lora", "lora (fast path off)")],
                  ("within 5%", lambda x: abs(x - 1) <= 0.05)),
    "t2i_adapter": Group(["t2i_adapter", "t2i_adapter (UNet not frozen)"], "t2i_adapter (UNet not frozen)",
                         [("t2i_adapter", "t2i_adapter (UNet not frozen)")]),
    "full_unet": Group(["lora", "full unet"], "full unet", [("lora", "full unet")]),
}
DEFAULT_GROUPS = ["textual_inversion", "lora", "t2i_adapter"]


def check_same_work(results: dict) -> None:
    """Raise where two sides of a group would not do the same work (token ids, LoRA sizes)."""
    ti = [results[n].info["input_ids"] for n in ("textual_inversion", "textual_inversion (diffusers)") if n in results]
    if len(ti) == 2 and ti[0] != ti[1]:
        raise SystemExit("the two textual inversions must train on the same token ids")
    lora = {n: results[n].info["trainable"] for n in results if n.startswith("lora")}
    if len(set(lora.values())) > 1:
        raise SystemExit(f"the LoRA sides differ in trainable elements: {lora}")


def columns() -> dict[str, Callable]:
    """Extra table columns: trainable elements, optimizer state and gradients a step leaves."""
    return {"trainable": lambda r: fmt_count(r.info["trainable"]),
            "opt state MiB": lambda r: mib(r.info.get("state_bytes")),
            "grads MiB": lambda r: mib(r.info.get("grad_bytes"))}


def run_group(name: str, arch: str, args: argparse.Namespace) -> list[str]:
    """Measure group ``name`` on ``arch`` (whole, or pair by pair); the report lines."""
    group = GROUPS[name]
    kwargs = {"arch": arch, "batch_size": args.batch, "latent": args.latent, "device": args.device}
    whole = len(group.names) <= args.max_procs_for(arch)
    runs = [(group.names, group.reference)] if whole else [([a, b], b) for a, b in group.pairs]
    lines = []
    for names, reference in runs:
        contenders = [Contender(n, build, {"name": n, **kwargs}) for n in names]
        results = compare(contenders, rounds=args.rounds, warmup=args.warmup, device=args.device, threads=args.threads)
        check_same_work(results)
        lines += [f"\n{arch}: {name}, reference (ref): {reference}", table(results, reference, columns(), "ref")]
        lines += [f"{n}: {results[n].info['lora']}" for n in names if "lora" in results[n].info]
        if group.target and reference == group.reference:
            label, ok = group.target
            median, minimum = ratios(results, reference)[group.names[0]]
            verdict = "met" if ok(median) else "NOT met"
            lines.append(f"target {name} ({arch}): {label}: {median:.3f}x (median of rounds; {minimum:.3f}x of "
                         f"minima) {verdict}")
    print("\n".join(lines), flush=True)
    return lines


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Arguments (the harness's common ones, the architectures, groups, sizes and the memory limits)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser, rounds=5, warmup=1)
    parser.add_argument("--archs", default="tiny,sd15", help="comma-separated: tiny, sd15")
    parser.add_argument("--groups", default=",".join(DEFAULT_GROUPS), help=f"comma-separated: {', '.join(GROUPS)}")
    parser.add_argument("--latent", type=int, default=None, help="SD 1.5 latent size (default 16 on CPU, 64 on CUDA)")
    parser.add_argument("--batch", type=int, default=1, help="SD 1.5 batch size")
    parser.add_argument("--quick", action="store_true", help="the tiny pipeline only, 15 rounds after 3 warm-up")
    parser.add_argument("--full-unet", action="store_true",
                        help="add the full_unet group (LoRA / full UNet fine-tuning); SD 1.5 on CPU holds ~14 GB "
                        "for the full fine-tune: check free memory first")
    parser.add_argument("--max-procs", type=int, default=2,
                        help="SD 1.5 on CPU: at most this many contender processes at once (~5 GB each); "
                        "a larger group runs as pairs")
    args = parser.parse_args(argv)
    cuda = resolve_device(args).startswith("cuda")
    args.latent = args.latent or (64 if cuda else 16)
    args.archs = ["tiny"] if args.quick else args.archs.split(",")
    if args.quick:  # tiny steps take ~0.1 s: many rounds are cheap and needed against noise
        args.rounds, args.warmup = 15, 3
    args.groups = args.groups.split(",")
    if args.full_unet and "full_unet" not in args.groups:
        args.groups.append("full_unet")
    if "full_unet" in args.groups and not args.full_unet:
        parser.error("the full_unet group needs --full-unet (it is memory-hungry)")
    args.max_procs_for = lambda arch: args.max_procs if arch == "sd15" and not cuda else 99
    return args


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark and print (and return) the tables."""
    args = parse(argv)
    header = (f"device {args.device}; SD 1.5: batch {args.batch}, {args.latent}x{args.latent} latents; tiny: batch 2, "
              f"16x16 latents\n{describe(args)}")
    print(header, flush=True)
    lines = [header]
    for arch in args.archs:
        for name in args.groups:
            lines += run_group(name, arch, args)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
