"""Training-step and inference cost of every visionpeft.vit method, next to full fine-tuning.

    python benchmarks/vit_speed.py                       # CPU: vit_small_patch16_224, batch 8, 224 px, fp32
    python benchmarks/vit_speed.py --device cuda         # CUDA: vit_base_patch16_224, batch 64, bf16

Every method trains the same model (random weights: speed does not depend on them) on the same
batch; a step is zero_grad, forward, cross-entropy, backward and AdamW. Each method runs in its own
process (``benchmarks/harness.py``), the steps interleaved round by round with the order rotated,
timed as CPU seconds of a single-threaded process on CPU and with CUDA events on CUDA. The tables
give the median of the per-round ratios to full fine-tuning and the ratio of the minima, and each
process's peak resident memory, also above its built model (on CUDA, the allocator's peak).
"lora (peft forward)" is LoRA with visionpeft's fast LoRA path turned off, i.e. peft's own layers.

Inference: a no-grad forward of plain, LoRA unmerged, LoRA merged, AdaptFormer and VPT-deep models,
relative to the plain model. On CUDA also images/s and model FLOPs utilisation (FLOPs counted with
``torch.utils.flop_counter.FlopCounterMode`` over one step, against ``--peak-tflops``).
"""

from __future__ import annotations

import argparse
from typing import Any

from harness import Contender, add_common_args, compare, describe, fmt_count, ratios, resolve_device, spread, table

#: contender name → (visionpeft method, its arguments); None is full fine-tuning (no method)
METHODS: dict[str, tuple[str | None, dict]] = {
    "full": (None, {}),
    "linear": ("linear", {}),
    "bitfit": ("bitfit", {}),
    "lora": ("lora", {"r": 8}),
    "lora (peft forward)": ("lora", {"r": 8}),
    "vpt-shallow": ("vpt", {"num_tokens": 10, "deep": False}),
    "vpt-deep": ("vpt", {"num_tokens": 10, "deep": True}),
    "adaptformer": ("adaptformer", {"bottleneck": 64}),
    "ssf": ("ssf", {}),
    "ia3": ("ia3", {}),
    "adapter-houlsby": ("adapter", {"variant": "houlsby"}),
    "adapter-pfeiffer": ("adapter", {"variant": "pfeiffer"}),
    "prefix": ("prefix", {"num_tokens": 10}),
    "gated-prompt": ("gated_prompt", {"num_tokens": 10}),
    "lora-dora": ("lora", {"r": 8, "dora": True}),
    # Video: one clip of FRAMES frames per 8 images of the batch, through VideoClassifier.
    "video-full": (None, {}),
    "video-st-adapter": ("st_adapter", {}),
    "video-aim": ("aim", {}),
}
FRAMES = 8
#: Trained by default: each contender is a process of about 1-2 GB, so the newer methods are a
#: second run (``--methods full,ssf,ia3,...`` or ``--methods newer``).
DEFAULT_TRAIN = ["full", "linear", "bitfit", "lora", "lora (peft forward)", "vpt-shallow", "vpt-deep", "adaptformer"]
NEWER = ["full", "ssf", "ia3", "adapter-houlsby", "adapter-pfeiffer", "prefix", "gated-prompt", "lora-dora"]
VIDEO = ["video-full", "video-st-adapter", "video-aim"]
INFERENCE = ["plain", "lora (unmerged)", "lora (merged)", "adaptformer", "vpt-deep"]
DTYPES = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


# --- in the contender's process -------------------------------------------------------------------


def plain_model(model_name: str, size: int, num_classes: int = 10) -> Any:
    """A fresh timm ViT with seeded random weights."""
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=size)


def set_fast_lora(model: Any, enabled: bool) -> str:
    """Turn visionpeft's fast LoRA path on or off; says how many layers have it."""
    from visionpeft.generic import lora, lora_fast

    lora.set_fast_path(model, enabled)
    count = sum(map(lora_fast.is_fast, model.modules()))
    return f"fast path {'on' if enabled else 'off'} ({count} fast layers)"


def method_model(name: str, model_name: str, size: int) -> tuple[Any, dict]:
    """The plain ViT with contender ``name``'s method attached, and notes for the info dict."""
    import visionpeft as vp

    method, kwargs = METHODS[name]
    model = plain_model(model_name, size)
    if name.startswith("video-"):
        from visionpeft.vit.video import VideoClassifier

        model = VideoClassifier(model, FRAMES)
    notes: dict = {}
    if method is not None:
        model = vp.attach(model, method, **kwargs)
    if method == "lora":
        notes["lora"] = set_fast_lora(model, name == "lora")
    return model, notes


def batch(batch_size: int, size: int, device: str, video: bool = False) -> tuple[Any, Any]:
    """A fixed random batch of images (or of clips with as many frames in all) and 10-class labels."""
    import torch

    g = torch.Generator().manual_seed(1)
    shape = (max(1, batch_size // FRAMES), FRAMES, 3, size, size) if video else (batch_size, 3, size, size)
    images = torch.randn(*shape, generator=g)
    labels = torch.randint(0, 10, (shape[0],), generator=g)
    return images.to(device), labels.to(device)


def autocast(device: str, precision: str) -> Any:
    """The autocast context of ``precision`` (a no-op context for fp32)."""
    import torch

    dtype = DTYPES[precision]
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype or "float32"), enabled=dtype is not None)


class _GlobalOnly:
    """Stands in for FlopCounterMode's per-module tracker, which fails on VPT's prompt hooks in backward
    ("Expected gradient function to be set"); only the total is needed here."""

    parents = ("Global",)

    def __enter__(self) -> _GlobalOnly:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def count_flops(step: Any) -> int:
    """FLOPs of one call of ``step`` (matrix products and convolutions, as FlopCounterMode counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    counter.mod_tracker = _GlobalOnly()
    with counter:
        step()
    return int(counter.get_total_flops())


def flops_on_first_call(step: Any, info: dict) -> Any:
    """``step``, whose first call (a warm-up round) also counts its FLOPs into ``info["flops"]``.

    Counting in the build would run a step there, and its gradients and optimizer state would be in
    the base memory the harness measures after the build.
    """

    def wrapped() -> None:
        if "flops" in info:
            step()
        else:
            info["flops"] = count_flops(step)

    return wrapped


def build_train(name: str, model_name: str, size: int, batch_size: int, precision: str, device: str,
                flops: bool) -> tuple[Any, dict]:
    """Contender ``name``'s training step (zero_grad, forward, loss, backward, AdamW) and its info."""
    import torch
    from torch import nn

    import visionpeft as vp
    from visionpeft.method import set_train_mode

    model, info = method_model(name, model_name, size)
    model = model.to(device)
    set_train_mode(model, True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    images, labels = batch(batch_size, size, device, video=name.startswith("video-"))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()

    info["trainable"] = vp.summary(model)["trainable"]
    return (flops_on_first_call(step, info) if flops else step), info


def build_infer(name: str, model_name: str, size: int, batch_size: int, precision: str, device: str,
                flops: bool) -> tuple[Any, dict]:
    """A no-grad forward of inference variant ``name`` (see :data:`INFERENCE`)."""
    import torch

    import visionpeft as vp

    model = plain_model(model_name, size)
    info: dict = {}
    if name.startswith("lora"):
        model = vp.attach(model, "lora", r=8)
        info["lora"] = set_fast_lora(model, True)
        if name == "lora (merged)":
            model = vp.merge(model)
    elif name == "adaptformer":
        model = vp.attach(model, "adaptformer", bottleneck=64)
    elif name == "vpt-deep":
        model = vp.attach(model, "vpt", num_tokens=10, deep=True)
    model = model.to(device).eval()
    images, _ = batch(batch_size, size, device)

    def step() -> None:
        with torch.no_grad(), autocast(device, precision):
            model(images)

    return (flops_on_first_call(step, info) if flops else step), info


# --- in the parent --------------------------------------------------------------------------------


def extra_columns(args: argparse.Namespace, training: bool) -> dict:
    """Table columns beyond the harness's: trainable counts, and on CUDA images/s and MFU."""
    import statistics

    columns = {"trainable": lambda r: fmt_count(r.info.get("trainable", "-"))} if training else {}
    if args.flops:
        columns["images/s"] = lambda r: f"{args.batch / statistics.median(r.times):,.0f}"
        columns["MFU"] = lambda r: f"{r.info['flops'] / statistics.median(r.times) / (args.peak_tflops * 1e12):.1%}"
        columns["GFLOP/step"] = lambda r: f"{r.info['flops'] / 1e9:,.0f}"
    return columns


def run(args: argparse.Namespace, names: list[str], build: Any, reference: str, title: str) -> None:
    """Time ``names`` with ``build`` on the harness and print a table relative to ``reference``."""
    kwargs = {"model_name": args.model, "size": args.size, "batch_size": args.batch, "precision": args.precision,
              "device": args.device, "flops": args.flops}
    contenders = [Contender(n, build, {"name": n, **kwargs}) for n in names]
    results = compare(contenders, rounds=args.rounds, warmup=args.warmup, device=args.device, threads=args.threads)
    print(f"\n{title}: {args.model}, batch {args.batch}, {args.size} px, {args.precision}, {args.device}")
    print(describe(args))
    print(table(results, reference, extra_columns(args, build is build_train)))
    notes = sorted({r.info["lora"] for r in results.values() if "lora" in r.info})
    if notes:
        print("LoRA: " + "; ".join(notes))
    if "lora" in results and "lora (peft forward)" in results:
        median, minimum = ratios(results, "lora (peft forward)")["lora"]
        low, high = spread(results, "lora", "lora (peft forward)")
        print(f"lora / lora (peft forward): {median:.3f} (median of rounds, range {low:.2f} to {high:.2f}), "
              f"{minimum:.3f} (of minima)")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Arguments; model, batch and precision default by device (ViT-S fp32 batch 8 on CPU, ViT-B bf16 64 on CUDA)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--model", default=None, help="timm model (vit_small_patch16_224 on CPU, vit_base on CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (8 on CPU, 64 on CUDA)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precision", choices=list(DTYPES), default=None, help="fp32 on CPU, bf16 on CUDA")
    parser.add_argument("--methods", default=",".join(DEFAULT_TRAIN),
                        help=f"comma-separated training contenders, 'newer' ({','.join(NEWER)}) or 'video' "
                        f"({','.join(VIDEO)}: clips of {FRAMES} frames, as many frames as --batch images); known: "
                        f"{', '.join(METHODS)}")
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the device's dense peak for MFU (989: H100/H200 bf16)")
    parser.add_argument("--flops", action="store_true", help="count FLOPs on CPU too (always on CUDA)")
    args = parser.parse_args(argv)
    cuda = resolve_device(args).startswith("cuda")
    args.model = args.model or ("vit_base_patch16_224" if cuda else "vit_small_patch16_224")
    args.batch = args.batch or (64 if cuda else 8)
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.flops = args.flops or cuda
    if args.flops and args.warmup < 1:
        parser.error("FLOPs are counted in the first warm-up round: give --warmup 1 or more")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    groups = {"newer": NEWER, "video": VIDEO}
    names = groups.get(args.methods) or [n for n in args.methods.split(",") if n]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    if not args.skip_training:
        reference = next((n for n in ("full", "video-full") if n in names), names[0])
        run(args, names, build_train, reference, "training step")
    if not args.skip_inference:
        run(args, INFERENCE, build_infer, "plain", "inference (no-grad forward)")


if __name__ == "__main__":
    main()
