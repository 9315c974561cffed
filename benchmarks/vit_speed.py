"""Training-step and inference cost of every visionpeft.vit method, next to full fine-tuning.

    python benchmarks/vit_speed.py                       # CPU: vit_small_patch16_224, batch 8, 224 px
    python benchmarks/vit_speed.py --model vit_base_patch16_224 --batch 64 --precision bf16   # CUDA

Every method trains the same model on the same batch. Steps (forward, backward, optimizer) run in
interleaved rounds (one step of each method per round, the order rotated every round) after warm-up
rounds, so that load on a shared machine hits every method alike; the script prints medians and the
ratio of each median to full fine-tuning's. Memory: on CUDA the allocator's peak during a step; on CPU
the bytes a step holds beyond the frozen weights (tensors saved for backward, gradients and
optimizer state), measured with autograd's saved-tensor hooks. Inference: the adapted model's forward
(merged, for LoRA) relative to the plain model's.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import visionpeft as vp
from visionpeft.method import set_train_mode

METHODS: dict[str, dict] = {
    "full": {},
    "linear": {},
    "bitfit": {},
    "lora": {"r": 8},
    "vpt-shallow": {"num_tokens": 10, "deep": False},
    "vpt-deep": {"num_tokens": 10, "deep": True},
    "adaptformer": {"bottleneck": 64},
}


def plain_model(model_name: str, size: int, num_classes: int = 10) -> nn.Module:
    """A fresh timm ViT (random weights: speed does not depend on them)."""
    import timm

    torch.manual_seed(0)
    return timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=size)


def build(name: str, model_name: str, size: int) -> nn.Module:
    """The plain ViT with method ``name`` attached."""
    model = plain_model(model_name, size)
    method = name.split("-")[0]
    return vp.attach(model, method, **METHODS[name])


class StepMemory:
    """Bytes a training step holds beyond the frozen weights, on CPU (saved activations + grads + state)."""

    def __init__(self) -> None:
        self.saved = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, nn.Parameter):
            self.saved += tensor.numel() * tensor.element_size()
        return tensor


def make_step(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, precision: str) -> Callable[[], float]:
    """One optimizer step of ``model`` on the batch; returns a closure that runs it and gives its bytes."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    set_train_mode(model, True)

    def step() -> float:
        memory = StepMemory()
        optimizer.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(memory.pack, lambda t: t), torch.autocast(
            images.device.type, dtype=dtype or torch.float32, enabled=dtype is not None
        ):
            loss = nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                    if torch.is_tensor(t))
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        return memory.saved + state + grads

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], float], device: torch.device) -> tuple[float, float]:
    """Wall time of one call, and its memory (CUDA peak, or the CPU estimate ``fn`` returns)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sync(device)
    start = time.perf_counter()
    estimate = fn()
    sync(device)
    elapsed = time.perf_counter() - start
    memory = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else estimate
    return elapsed, memory


def train_steps(args: argparse.Namespace, device: torch.device) -> None:
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    names = [n for n in METHODS if n in args.methods]
    steps, times, memory, trainable = {}, {n: [] for n in names}, {n: [] for n in names}, {}
    for name in names:
        model = build(name, args.model, args.size).to(device)
        trainable[name] = vp.summary(model)["trainable"]
        steps[name] = make_step(model, images, labels, args.precision)
    for round_index in range(args.warmup + args.rounds):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            elapsed, mem = timed(steps[name], device)
            if round_index >= args.warmup:
                times[name].append(elapsed)
                memory[name].append(mem)
    full = statistics.median(times["full"]) if "full" in times else None
    full_mem = statistics.median(memory["full"]) if "full" in memory else None
    print(f"\ntraining step: {args.model}, batch {args.batch}, {args.size} px, {args.precision}, {device}; "
          f"median of {args.rounds} interleaved rounds after {args.warmup} warm-up rounds")
    print(f"{'method':<14}{'trainable':>12}{'median s':>11}{'vs full':>9}{'memory MB':>11}{'vs full':>9}")
    for name in names:
        t, m = statistics.median(times[name]), statistics.median(memory[name])
        ratio = f"{t / full:.2f}x" if full else "-"
        mratio = f"{m / full_mem:.2f}x" if full_mem else "-"
        print(f"{name:<14}{trainable[name]:>12,}{t:>11.3f}{ratio:>9}{m / 2**20:>11.1f}{mratio:>9}")


def inference(args: argparse.Namespace, device: torch.device) -> None:
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    plain = plain_model(args.model, args.size).to(device).eval()
    models = {"plain": plain}
    lora = vp.attach(copy.deepcopy(plain), "lora", r=8)
    models["lora (unmerged)"] = lora
    models["lora (merged)"] = vp.merge(vp.attach(copy.deepcopy(plain), "lora", r=8))
    models["adaptformer"] = vp.attach(copy.deepcopy(plain), "adaptformer")
    models["vpt-deep"] = build("vpt-deep", args.model, args.size).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    times = {n: [] for n in models}
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        for round_index in range(args.warmup + args.rounds):
            names = list(models)
            order = names[round_index % len(names):] + names[: round_index % len(names)]
            for name in order:
                model = models[name].eval()
                elapsed, _ = timed(lambda m=model: float(m(images).sum()), device)
                if round_index >= args.warmup:
                    times[name].append(elapsed)
    base = statistics.median(times["plain"])
    print(f"\ninference: batch {args.batch}, median of {args.rounds} interleaved rounds")
    print(f"{'model':<18}{'median s':>11}{'vs plain':>10}")
    for name, values in times.items():
        print(f"{name:<18}{statistics.median(values):>11.4f}{statistics.median(values) / base:>9.3f}x")


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224" if cuda else "vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=64 if cuda else 8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16" if cuda else "fp32")
    parser.add_argument("--rounds", type=int, default=10 if cuda else 5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--skip-inference", action="store_true")
    args = parser.parse_args()
    args.methods = args.methods.split(",")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if cuda else "cpu")
    train_steps(args, device)
    if not args.skip_inference:
        inference(args, device)


if __name__ == "__main__":
    main()
