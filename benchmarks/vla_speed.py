"""Training-step speed and memory of the CLIP prompt learners, each configuration in its own process.

1. CoCoOp: our batched text-tower calls, which stop at the last end-of-text token, against the
   original's per-image loop over all 77 positions (``CoCoOpCLIP.forward_loop``), at the same batch
   and classes: one call of everything, the default chunks, chunks + ``checkpoint_chunks`` (the
   memory option), and "before": batched at the full 77 positions, which shows what the cut adds.
   Also a check that the batched logits equal the loop's (max |delta|, asserted <= 1e-5).
2. CoOp and MaPLe training steps at the full 77 positions (before) and cut at the end token (after).
3. The most that computing CoCoOp's start token + context once per image could save: under the
   causal mask positions ``0..n_ctx`` are the same for every class of an image, so the text tower
   could skip them for all classes but one. The bound is the text tower's forward + backward at
   length ``n`` against ``n - (1 + n_ctx)`` (it ignores the prefix's own one-per-image pass).

Timing and memory come from ``harness.py``: one spawned process per configuration, interleaved
rounds with the order rotated, CPU seconds of each process with ``--threads`` (default 1) torch
threads, or CUDA events; peak resident memory per process and what the steps add on top of the
built model. "Kept for backward" is the bytes autograd saves during one step (saved-tensor hooks,
each storage once, parameters not counted). Random weights: speed does not depend on them.

    python benchmarks/vla_speed.py                        # CPU: tiny CLIP 8 x 100 and ViT-B-16 4 x 10
    python benchmarks/vla_speed.py --device cuda --arch ViT-B-16 --batch 32 --classes 100
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import importlib
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from harness import Contender, Result, add_common_args, compare, describe, markdown, mib, resolve_device, round_ratios

import visionpeft as vp

TINY = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2},
}
#: (batch, classes) per architecture on CPU; on CUDA 32 x 100
CPU_SIZES = {"tiny": (8, 100), "ViT-B-16": (4, 10)}
TOLERANCE = 1e-5  # batched logits against the loop's, fp32


# --- what every contender builds ------------------------------------------------------------------


def make_clip(arch: str, device: str) -> torch.nn.Module:
    """A randomly initialised open_clip model in eval mode: ``tiny`` or an open_clip architecture name."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY) if arch == "tiny" else open_clip.create_model(arch, pretrained=None)
    return model.to(device).eval()


def make_batch(clip: torch.nn.Module, batch: int, classes: int,
               device: str) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Class names ("object number i"), random images at the model's size and random labels."""
    names = [f"object number {i}" for i in range(classes)]
    gen = torch.Generator().manual_seed(0)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
    return names, images, labels


def force_full_length(*modules: str) -> None:
    """Make ``encode_embeddings`` in these ``visionpeft.vla`` modules run all positions: the code before the cut.

    Patched in the contender's own process only (each contender has one), so nothing else sees it.
    """
    from visionpeft.vla import text

    @functools.wraps(text.encode_embeddings)
    def full_length(*args: Any, **kwargs: Any) -> torch.Tensor:
        return text.encode_embeddings(*args, **{**kwargs, "full_length": True})

    for name in modules:
        importlib.import_module(f"visionpeft.vla.{name}").encode_embeddings = full_length


def release_freed_memory() -> None:
    """Hand memory freed by the build's trial step back to the OS (glibc ``malloc_trim``), so that the harness's
    resident size after the build is the model and its inputs, and "above base" is what the timed steps add."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


class SavedBytes:
    """Bytes of the tensors autograd keeps for backward while the context is active.

    Each storage counts once (a weight saved by every call that reads it is one tensor in memory),
    and parameters do not count: they are in memory anyway.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.total = 0
        self._seen = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def __enter__(self) -> SavedBytes:
        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in self._seen:
                self._seen.add(storage.data_ptr())
                self.total += storage.nbytes()
            return t

        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Forward, cross-entropy, backward; the gradients are dropped for the next step."""
    F.cross_entropy(forward(images), labels).backward()
    model.zero_grad(set_to_none=True)


def text_positions(clip: torch.nn.Module, run: Callable[[], Any]) -> int:
    """The longest sequence the text transformer's first block sees during ``run()``."""
    seen = []
    block = clip.transformer.resblocks[0]
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        run()
    finally:
        handle.remove()
    return max(seen)


def step_info(model: torch.nn.Module, step: Callable[[], None]) -> dict:
    """What one step keeps for backward (bytes) and how many text positions it runs (one trial step)."""
    with SavedBytes(model) as saved:
        positions = text_positions(model.clip, step)
    return {"kept": saved.total, "positions": positions}


# --- builds (module level: the harness pickles them by reference) ---------------------------------


def build_cocoop(arch: str, batch: int, classes: int, device: str, variant: str, chunk: int | None = None,
                 checkpoint_chunks: bool = False) -> tuple[Callable[[], None], dict]:
    """A CoCoOp training step: ``variant`` "loop" (the original), "batched", or "before" (batched, 77 positions)."""
    if variant == "before":
        force_full_length("cocoop")
    clip = make_clip(arch, device)
    names, images, labels = make_batch(clip, batch, classes, device)
    model = vp.attach(clip, "cocoop", classnames=names, text_chunk_size=chunk,
                      checkpoint_chunks=checkpoint_chunks).to(device)
    forward = model.forward_loop if variant == "loop" else model

    def step() -> None:
        train_step(model, images, labels, forward)

    info = step_info(model, step)
    if variant != "loop":
        with torch.no_grad():
            info["max_abs_diff_vs_loop"] = float((model(images) - model.forward_loop(images)).abs().max())
    release_freed_memory()
    return step, info


def build_prompt_step(method: str, arch: str, batch: int, classes: int, device: str, full_length: bool,
                      **kwargs: Any) -> tuple[Callable[[], None], dict]:
    """A CoOp or MaPLe training step, at all 77 positions (``full_length``, as before the cut) or cut."""
    if full_length:
        force_full_length(method)
    clip = make_clip(arch, device)
    names, images, labels = make_batch(clip, batch, classes, device)
    model = vp.attach(clip, method, classnames=names, **kwargs).to(device)

    def step() -> None:
        train_step(model, images, labels, model)

    info = step_info(model, step)
    release_freed_memory()
    return step, info


def build_tower_pass(arch: str, batch: int, classes: int, device: str,
                     skip_prefix: bool) -> tuple[Callable[[], None], dict]:
    """Forward + backward of the text transformer over CoCoOp's ``batch x classes`` prompts, cut at the end token,
    with ``skip_prefix`` ``1 + n_ctx`` positions shorter: the work left if the start token and the context were
    computed once per image elsewhere."""
    from visionpeft.vla.text import sequence_length

    clip = make_clip(arch, device)
    names, images, _ = make_batch(clip, batch, classes, device)
    model = vp.attach(clip, "cocoop", classnames=names).to(device)
    learner = model.prompt_learner
    tower = learner.tower
    with torch.no_grad():
        prompts = learner(model.encode_images(images)).flatten(0, 1)
    length = sequence_length(tower, learner.tokenized_prompts) - (1 + learner.n_prompt if skip_prefix else 0)
    x = (prompts[:, :length] + tower.positional_embedding[:length]).detach().requires_grad_(True)
    mask = tower.attn_mask[:length, :length]

    def step() -> None:
        tower.transformer(x, attn_mask=mask).square().mean().backward()
        x.grad = None

    return step, {"positions": length, "n_ctx": learner.n_prompt}


# --- the comparisons ------------------------------------------------------------------------------


def sizes(arch: str, args: argparse.Namespace) -> tuple[int, int]:
    """(batch, classes): the command line's, else 32 x 100 on CUDA and :data:`CPU_SIZES` on CPU."""
    default = (32, 100) if args.device.startswith("cuda") else CPU_SIZES.get(arch, (4, 10))
    return args.batch or default[0], args.classes or default[1]


def cocoop_contenders(arch: str, batch: int, classes: int, device: str, chunk: int) -> list[Contender]:
    """The loop (reference), before (batched at 77), and the batched variants."""
    common = {"arch": arch, "batch": batch, "classes": classes, "device": device}
    return [
        Contender("loop, 77 positions (original)", build_cocoop, {**common, "variant": "loop"}),
        Contender("before: batched, 77 positions", build_cocoop, {**common, "variant": "before"}),
        Contender("batched, cut, default chunks", build_cocoop, {**common, "variant": "batched"}),
        Contender(f"batched, cut, one call of {batch * classes}", build_cocoop,
                  {**common, "variant": "batched", "chunk": batch * classes}),
        Contender(f"batched, cut, chunks of {chunk} + checkpoint_chunks", build_cocoop,
                  {**common, "variant": "batched", "chunk": chunk, "checkpoint_chunks": True}),
    ]


def speedup_table(results: dict[str, Result], reference: str, label: str) -> str:
    """Markdown: per contender, ``reference / this`` (median of per-round ratios and of minima) and memory."""
    headers = ["contender", "text positions", "median s", f"{label} / this (median of rounds)",
               f"{label} / this (of minima)", "kept for backward MiB", "peak RSS MiB", "above base MiB"]
    cuda = any(r.cuda_peak is not None for r in results.values())
    headers += ["CUDA peak MiB"] if cuda else []
    ref_min = min(results[reference].times)
    rows = []
    for name, r in results.items():
        row = [name, str(r.info["positions"]), f"{statistics.median(r.times):.4f}",
               f"{statistics.median(round_ratios(results, reference, name)):.2f}x", f"{ref_min / min(r.times):.2f}x",
               mib(r.info.get("kept")), mib(r.peak_rss), mib(r.above_base)]
        rows.append(row + ([mib(r.cuda_peak)] if cuda else []))
    return markdown(headers, rows)


def check_equal_logits(results: dict[str, Result]) -> None:
    """Print every batched variant's max |logits - loop logits| and assert it is within :data:`TOLERANCE`."""
    diffs = {name: r.info["max_abs_diff_vs_loop"] for name, r in results.items() if "max_abs_diff_vs_loop" in r.info}
    print("\nmax |batched logits - loop logits|: " + ", ".join(f"{n}: {d:.2e}" for n, d in diffs.items()))
    bad = {n: d for n, d in diffs.items() if not d <= TOLERANCE}
    assert not bad, f"batched logits differ from the loop's by more than {TOLERANCE}: {bad}"


def run_cocoop(arch: str, args: argparse.Namespace) -> None:
    batch, classes = sizes(arch, args)
    chunk = args.chunk if args.device.startswith("cuda") else max(1, min(args.chunk, batch * classes // 2))
    print(f"\n## CoCoOp step, {arch}, batch {batch}, {classes} classes ({batch * classes} prompt sequences), "
          f"device {args.device}\n\n{describe(args)}\n")
    contenders = cocoop_contenders(arch, batch, classes, args.device, chunk)
    results = compare(contenders, rounds=args.rounds, warmup=args.warmup, device=args.device, threads=args.threads)
    print(speedup_table(results, contenders[0].name, "loop"))
    check_equal_logits(results)


def run_prompt_steps(arch: str, args: argparse.Namespace) -> None:
    batch, classes = sizes(arch, args)
    common = {"arch": arch, "batch": batch, "classes": classes, "device": args.device}
    depth = 9 if arch != "tiny" else 2
    for method, kwargs, label in (("coop", {"n_ctx": 16}, "CoOp (16 contexts)"),
                                  ("maple", {"prompt_depth": depth}, f"MaPLe (depth {depth})")):
        print(f"\n## {label} step, {arch}, batch {batch}, {classes} classes, device {args.device}\n\n"
              f"{describe(args)}\n")
        contenders = [Contender("before: 77 positions", build_prompt_step,
                                {**common, "method": method, "full_length": True, **kwargs}),
                      Contender("after: cut at the end token", build_prompt_step,
                                {**common, "method": method, "full_length": False, **kwargs})]
        results = compare(contenders, rounds=args.rounds, warmup=args.warmup, device=args.device,
                          threads=args.threads)
        print(speedup_table(results, contenders[0].name, "before"))


def run_prefix_bound(arch: str, args: argparse.Namespace) -> None:
    batch, classes = sizes(arch, args)
    common = {"arch": arch, "batch": batch, "classes": classes, "device": args.device}
    print(f"\n## Bound of a shared start token + context per image (CoCoOp), {arch}, {batch * classes} sequences: "
          f"text transformer forward + backward\n\n{describe(args)}\n")
    contenders = [Contender("cut at the end token", build_tower_pass, {**common, "skip_prefix": False}),
                  Contender("without start token + context", build_tower_pass, {**common, "skip_prefix": True})]
    results = compare(contenders, rounds=args.rounds, warmup=args.warmup, device=args.device, threads=args.threads)
    print(speedup_table(results, contenders[0].name, "cut"))


SECTIONS = {"cocoop": run_cocoop, "prompts": run_prompt_steps, "prefix": run_prefix_bound}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, rounds=7, warmup=2)
    parser.add_argument("--arch", action="append", help="tiny or an open_clip name (repeatable; default both)")
    parser.add_argument("--batch", type=int, help="images per step (default: 8 tiny / 4 ViT on CPU, 32 on CUDA)")
    parser.add_argument("--classes", type=int, help="classes (default: 100 tiny / 10 ViT on CPU, 100 on CUDA)")
    parser.add_argument("--chunk", type=int, default=256, help="text_chunk_size of the checkpointed run")
    parser.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run only these sections")
    args = parser.parse_args(argv)
    resolve_device(args)
    for arch in args.arch or ["tiny", "ViT-B-16"]:
        for name in args.only or SECTIONS:
            SECTIONS[name](arch, args)


if __name__ == "__main__":
    main()
