"""Training-step speed and memory of the CLIP prompt learners, measured side by side in one run.

1. CoCoOp: our batched text-tower calls against the original's per-image loop, at the same batch
   and class count: step-time ratio, and the memory each keeps for backward (and, on CUDA, the
   peak allocated). Also with ``text_chunk_size`` + ``checkpoint_chunks``, the memory option.
2. CoOp and MaPLe training steps relative to a zero-shot forward of the same batch.

Median of ``--rounds`` interleaved rounds after a warm-up; ratios, not lone times, are the result.
Random weights: speed does not depend on them.

    python benchmarks/vla_speed.py                        # CPU: tiny model and ViT-B-16, small batches
    python benchmarks/vla_speed.py --device cuda --arch ViT-B-16 --batch 32 --classes 100
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

import visionpeft as vp

TINY = {
    "embed_dim": 64, "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 2},
}


def build(arch: str, device: str) -> torch.nn.Module:
    """A randomly initialised open_clip model: ``tiny`` or an open_clip architecture name."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY) if arch == "tiny" else open_clip.create_model(arch, pretrained=None)
    return model.to(device).eval()


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


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict[str, Callable[[], None]], rounds: int, device: str) -> dict[str, float]:
    """Median seconds of each function over interleaved rounds (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def train_step(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
               forward: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
    logits = (forward or model)(images)
    F.cross_entropy(logits, labels).backward()
    model.zero_grad(set_to_none=True)


def memory(step: Callable[[], None], model: torch.nn.Module, device: str) -> tuple[int, int | None]:
    """Bytes kept for backward during ``step``, and the CUDA peak allocated (None on CPU)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with SavedBytes(model) as saved:
        step()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    return saved.total, peak


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def run(arch: str, batch: int, classes: int, rounds: int, device: str, chunk: int) -> None:
    clip = build(arch, device)
    names = [f"object number {i}" for i in range(classes)]
    gen = torch.Generator().manual_seed(0)
    size = clip.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = torch.randn(batch, 3, size, size, generator=gen).to(device)
    labels = torch.randint(0, classes, (batch,), generator=gen).to(device)
    print(f"\n## {arch}, batch {batch}, {classes} classes, device {device}, {rounds} rounds")

    model = vp.attach(clip, "cocoop", classnames=names).to(device)
    def batched(chunk: int | None) -> Callable[[], None]:
        def step() -> None:
            model.text_chunk_size = chunk
            train_step(model, images, labels)
        return step

    whole = f"cocoop batched, one call of {batch * classes}"
    fns = {
        "cocoop batched (default chunks)": batched(None),
        whole: batched(batch * classes),
        "cocoop loop (original)": lambda: train_step(model, images, labels, model.forward_loop),
    }
    times = measure(fns, rounds, device)
    mem = {k: memory(fn, model, device) for k, fn in fns.items()}
    model.text_chunk_size, model.checkpoint_chunks = chunk, True
    chunked = f"cocoop batched, chunks of {chunk} + checkpointing"
    times[chunked] = measure({chunked: lambda: train_step(model, images, labels)}, rounds, device)[chunked]
    mem[chunked] = memory(lambda: train_step(model, images, labels), model, device)
    vp.detach(model)
    loop = times["cocoop loop (original)"]
    print("| CoCoOp step | median s | loop / this | kept for backward MiB | CUDA peak MiB |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.4f} | {loop / seconds:.2f}x | {_mib(mem[name][0])} | {_mib(mem[name][1])} |")

    def zero_shot() -> None:
        with torch.no_grad():
            zs(images)

    zs = vp.attach(clip, "zeroshot", classnames=names).to(device)
    zero_shot()  # builds the classifier once
    times = measure({"zero-shot forward": zero_shot}, rounds, device)
    vp.detach(zs)
    base = times["zero-shot forward"]
    rows = [("zero-shot forward", base)]
    coop = vp.attach(clip, "coop", classnames=names).to(device)
    rows.append(("coop step (16 ctx)", measure({"c": lambda: train_step(coop, images, labels)}, rounds, device)["c"]))
    vp.detach(coop)
    depth = min(9, len(clip.transformer.resblocks))
    maple = vp.attach(clip, "maple", classnames=names, prompt_depth=depth).to(device)
    rows.append((f"maple step (depth {depth})", measure({"m": lambda: train_step(maple, images, labels)}, rounds,
                                                        device)["m"]))
    vp.detach(maple)
    print("\n| step | median s | / zero-shot forward |")
    print("|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} | {seconds / base:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", action="append", help="tiny or an open_clip name (repeatable)")
    parser.add_argument("--batch", type=int, help="images per step (default: 8 tiny / 4 ViT on CPU, 32 on CUDA)")
    parser.add_argument("--classes", type=int, help="classes (default: 100 tiny, 10 ViT on CPU, 100 on CUDA)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=256, help="text_chunk_size of the memory-bounded run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for arch in args.arch or ["tiny", "ViT-B-16"]:
        cuda = args.device == "cuda"
        batch = args.batch or (32 if cuda else 8 if arch == "tiny" else 4)
        classes = args.classes or (100 if cuda or arch == "tiny" else 10)
        chunk = min(args.chunk, batch * classes // 2) if not cuda else args.chunk
        run(arch, batch, classes, args.rounds, args.device, max(1, chunk))


if __name__ == "__main__":
    main()
