"""Training-step cost of the diffusion methods next to the approaches of diffusers' example scripts.

    python benchmarks/diffusion_speed.py                  # CPU: tiny + SD 1.5 (16x16 latents), a few minutes
    python benchmarks/diffusion_speed.py --quick          # tiny pipeline only, seconds
    python benchmarks/diffusion_speed.py --device cuda --latent 64 --batch 4   # SD 1.5 at 512 px on a GPU

Pairs, each measured in the same run on the same weights and batch:

- ``textual_inversion``: visionpeft's (only the new vectors are a parameter; AdamW over them) against
  diffusers' ``textual_inversion.py`` (``resize_token_embeddings``, AdamW over the whole
  ``token_embedding.weight``, the other rows copied back after every step).
- ``lora``: ``vp.attach(model, "lora")`` against ``unet.add_adapter(LoraConfig(r=4, lora_alpha=4,
  init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))`` as in
  ``train_text_to_image_lora.py``; both train the same 4-rank updates.
- ``t2i_adapter``: visionpeft's (frozen UNet) against ``train_t2i_adapter_sdxl.py``'s setting, where
  the UNet is left trainable (``requires_grad``) although only the adapter is optimised.

Architectures: the tiny test pipeline (``tests/tiny_models.py``), and SD 1.5's UNet
(320/640/1280/1280, cross-attention 768) with a CLIP ViT-L/14 text encoder (12 layers, width 768,
CLIP's 49,408-token BPE vocabulary from open_clip's bundled file), random weights (speed does not
depend on them). The latents are given (as with cached latents), so the VAE is a small stand-in
with SD's scale factor 8 that no step runs. A step is the whole optimizer step: the denoising loss
of one batch (visionpeft's through :func:`visionpeft.diffusion.loss.diffusion_loss`, the
reference's written as the scripts write it), backward, AdamW (weight decay 1e-2, the scripts'
default) and, for the reference textual inversion, its row restore.

Steps run in interleaved rounds (ours and the reference alternate, the order swapped every round)
after warm-up rounds, and the table gives medians and the ratio ours / reference. Memory: on CUDA
the allocator's peak during a step above what was allocated before it; on CPU, where no allocator
peak is available, the bytes of optimizer state and of gradients a step leaves (the memory the
methods differ in; activations are the same for both sides of a pair).
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import visionpeft as vp
from visionpeft.method import set_train_mode

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
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if arch == "tiny":
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import tiny_sd_components

        return tiny_sd_components(0)
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


# --- one optimizer step -------------------------------------------------------------------------


class Batch:
    """The fixed batch of a pair: cached-latent posteriors, prompts and condition images."""

    def __init__(self, batch: int, latent: int, vae_scale: int, device: torch.device) -> None:
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
    """One training configuration: a loss closure, the parameters AdamW optimises, an after-step hook."""

    def __init__(self, loss: Callable[[], torch.Tensor], params: list[nn.Parameter], watched: list[nn.Parameter],
                 after: Callable[[], None] | None = None, before: Callable[[], None] | None = None) -> None:
        self.loss, self.params, self.watched, self.after, self.before = loss, params, watched, after, before
        self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.state_bytes = self.grad_bytes = 0

    def __call__(self) -> None:
        if self.before is not None:
            self.before()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()
        self.grad_bytes = tensor_bytes(p.grad for p in self.watched)
        self.state_bytes = tensor_bytes(t for s in self.optimizer.state.values() for t in s.values()
                                        if torch.is_tensor(t) and t.dim() > 0)
        if self.after is not None:
            self.after()

    @property
    def trainable(self) -> int:
        """Elements AdamW updates."""
        return sum(p.numel() for p in self.params)


def ti_pair(p: dict[str, Any], batch: Batch, device: torch.device) -> dict[str, Step]:
    """visionpeft's textual inversion and diffusers' ``textual_inversion.py`` on the same UNet."""
    initializer = "photo"
    model = container(p, text_encoder=copy.deepcopy(p["text_encoder"])).to(device)
    model = vp.attach(model, "textual_inversion", placeholder_token=PLACEHOLDER, initializer_token=initializer)
    set_train_mode(model, True)
    ids = model.tokenize([f"a photo of {PLACEHOLDER}"] * batch.size)["input_ids"].to(device)
    ours = Step(lambda: ours_loss(model, ids, batch), [q for q in model.parameters() if q.requires_grad],
                list(model.parameters()))

    # diffusers' script: add the token, resize the embedding, copy the initializer row, train the matrix.
    tokenizer = copy.deepcopy(p["tokenizer"])
    text_encoder = p["text_encoder"]  # ours works on a copy
    tokenizer.add_tokens([PLACEHOLDER])
    init_id = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(initializer))[0]
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
    ref_ids = tokenizer([f"a photo of {PLACEHOLDER}"] * batch.size, padding="max_length", max_length=77,
                        truncation=True, return_tensors="pt").input_ids.to(device)
    assert torch.equal(ref_ids, ids), "the two sides must train on the same token ids"
    unet = model.unet

    def restore() -> None:
        with torch.no_grad():
            embedding.weight[keep] = originals[keep]

    ref = Step(lambda: reference_loss(text_encoder, unet, model.noise_scheduler, ref_ids, batch),
               list(embedding.parameters()), list(text_encoder.parameters()) + list(unet.parameters()), after=restore)
    return {"textual_inversion": ours, "textual_inversion (diffusers)": ref}


def lora_pair(p: dict[str, Any], batch: Batch, device: torch.device) -> dict[str, Step]:
    """``vp.attach(model, "lora")`` and ``unet.add_adapter(LoraConfig(...))`` with the same rank and targets."""
    from peft import LoraConfig

    model = container(p, unet=copy.deepcopy(p["unet"])).to(device)
    model = vp.attach(model, "lora", r=4, alpha=4, init="gaussian")
    set_train_mode(model, True)
    ids = model.tokenize(["a photo of a cat"] * batch.size)["input_ids"].to(device)
    ours = Step(lambda: ours_loss(model, ids, batch), [q for q in model.parameters() if q.requires_grad],
                list(model.parameters()))

    unet = p["unet"]  # ours works on a copy
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    text_encoder = model.text_encoder
    ref = Step(lambda: reference_loss(text_encoder, unet, model.noise_scheduler, ids, batch),
               [q for q in unet.parameters() if q.requires_grad], list(unet.parameters()))
    if ours.trainable != ref.trainable:
        raise RuntimeError(f"LoRA sides differ: {ours.trainable} vs {ref.trainable} trainable elements")
    return {"lora": ours, "lora (unet.add_adapter)": ref}


def t2i_pair(p: dict[str, Any], batch: Batch, device: torch.device) -> dict[str, Step]:
    """visionpeft's T2I-Adapter (frozen UNet) and the SDXL script's setting (UNet left trainable), one UNet."""
    from diffusers import T2IAdapter

    model = container(p).to(device)
    model = vp.attach(model, "t2i_adapter")
    set_train_mode(model, True)
    ids = model.tokenize(["a photo of a cat"] * batch.size)["input_ids"].to(device)
    unet = model.unet
    ours = Step(lambda: ours_loss(model, ids, batch, condition=True),
                [q for q in model.parameters() if q.requires_grad], list(model.parameters()),
                before=lambda: unet.requires_grad_(False))

    adapter = T2IAdapter(**get_method_kwargs(model)).to(device)
    adapter.load_state_dict(model.t2i_adapter.state_dict())

    def unfreeze() -> None:
        unet.requires_grad_(True)  # train_t2i_adapter_sdxl.py never freezes the UNet (diffusers#5403)

    def clear() -> None:
        # The script keeps accumulating these gradients (they are not in its optimizer); dropping them
        # here keeps the next step of the other side from running with them allocated.
        for q in unet.parameters():
            q.grad = None
        unet.requires_grad_(False)

    ref = Step(lambda: reference_loss(model.text_encoder, unet, model.noise_scheduler, ids, batch, adapter),
               list(adapter.parameters()), list(adapter.parameters()) + list(unet.parameters()),
               before=unfreeze, after=clear)
    return {"t2i_adapter": ours, "t2i_adapter (UNet not frozen)": ref}


def get_method_kwargs(model: nn.Module) -> dict[str, Any]:
    """The ``T2IAdapter`` arguments the attached ``t2i_adapter`` method resolved."""
    from visionpeft.method import get_state

    return dict(get_state(model).adapters["default"].method.adapter_kwargs)


PAIRS = {"textual_inversion": ti_pair, "lora": lora_pair, "t2i_adapter": t2i_pair}


# --- timing -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that wall times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step: Step, device: torch.device) -> tuple[float, int | None]:
    """Wall time of one step, and on CUDA the allocator's peak above the memory in use before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync(device)
    start = time.perf_counter()
    step()
    sync(device)
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return elapsed, peak


def run_pair(name: str, arch: str, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Measure one pair on one architecture in interleaved rounds; one row per side."""
    p = parts(arch)
    latent = args.latent if arch != "tiny" else 16
    batch = Batch(args.batch if arch != "tiny" else 2, latent, 8 if arch != "tiny" else 2, device)
    p = {k: (v.to(device) if isinstance(v, nn.Module) else v) for k, v in p.items()}
    steps = PAIRS[name](p, batch, device)
    names = list(steps)
    times: dict[str, list[float]] = {n: [] for n in names}
    peaks: dict[str, list[int]] = {n: [] for n in names}
    torch.manual_seed(0)
    for round_index in range(args.warmup + args.rounds):
        order = names if round_index % 2 == 0 else names[::-1]
        for side in order:
            elapsed, peak = timed(steps[side], device)
            if round_index >= args.warmup:
                times[side].append(elapsed)
                if peak is not None:
                    peaks[side].append(peak)
    rows = []
    for side in names:
        step = steps[side]
        rows.append({
            "arch": arch, "pair": name, "side": side, "trainable": step.trainable,
            "median_s": statistics.median(times[side]), "min_s": min(times[side]),
            "state_bytes": step.state_bytes, "grad_bytes": step.grad_bytes,
            "peak_bytes": statistics.median(peaks[side]) if peaks[side] else None,
        })
    ours, ref = rows
    ours["ratio"] = ours["median_s"] / ref["median_s"]
    ours["min_ratio"] = ours["min_s"] / ref["min_s"]
    del steps, p
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def report(rows: list[dict[str, Any]], args: argparse.Namespace, device: torch.device) -> str:
    """The results table, and whether the targets are met."""
    memory = "CUDA peak MB" if device.type == "cuda" else "-"
    lines = [
        f"device {device}, {torch.get_num_threads()} threads; SD 1.5: batch {args.batch}, {args.latent}x{args.latent} "
        f"latents; tiny: batch 2, 16x16 latents; median of {args.rounds} interleaved rounds after {args.warmup} "
        "warm-up",
        f"{'arch':<6}{'method':<32}{'trainable':>12}{'median s':>10}{'ours/ref':>10}{'min s':>9}{'ours/ref':>10}"
        f"{'opt state B':>14}{'grad B':>14}{memory:>14}",
    ]
    for r in rows:
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        min_ratio = f"{r['min_ratio']:.2f}x" if "min_ratio" in r else ""
        lines.append(f"{r['arch']:<6}{r['side']:<32}{r['trainable']:>12,}{r['median_s']:>10.3f}{ratio:>10}"
                     f"{r['min_s']:>9.3f}{min_ratio:>10}{r['state_bytes']:>14,}{r['grad_bytes']:>14,}"
                     f"{_mb(r['peak_bytes']):>14}")
    targets = {"textual_inversion": ("<= 0.90x", lambda x: x <= 0.90),
               "lora": ("within 5%", lambda x: abs(x - 1) <= 0.05)}
    for r in rows:
        if r["pair"] in targets and "ratio" in r:
            label, ok = targets[r["pair"]]
            verdict = "met" if ok(r["ratio"]) else "NOT met"
            lines.append(f"target {r['pair']} ({r['arch']}): {label}: {r['ratio']:.3f}x (median) {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark and print (and return) the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--archs", default="tiny,sd15", help="comma-separated: tiny, sd15")
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated: {', '.join(PAIRS)}")
    parser.add_argument("--latent", type=int, default=None, help="SD 1.5 latent size (default 16 on CPU, 64 on CUDA)")
    parser.add_argument("--batch", type=int, default=1, help="SD 1.5 batch size")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads; one keeps timings stable on a shared machine (OpenMP threads that lose "
                        "their core make every other thread wait)")
    parser.add_argument("--quick", action="store_true", help="the tiny pipeline only, 3 rounds: seconds")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.latent is None:
        args.latent = 64 if device.type == "cuda" else 16
    archs = args.archs.split(",")
    if args.quick:
        archs, args.rounds = ["tiny"], min(args.rounds, 3)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    rows = []
    for arch in archs:
        for name in args.pairs.split(","):
            rows += run_pair(name, arch, args, device)
    text = report(rows, args, device)
    print(text)
    return text


if __name__ == "__main__":
    main()
