"""visionpeft's LoRA next to peft's own ``get_peft_model`` and full fine-tuning, on the same timm ViT.

    python benchmarks/compare_peft.py                     # CPU, vit_small_patch16_224, batch 8, 1 thread
    python benchmarks/compare_peft.py --device cuda --batch 64

Contenders, each in its own process (``benchmarks/harness.py``), the same seeded model and batch:

- ``visionpeft lora``: ``vp.attach(model, "lora", r=8)`` (alpha 8, the ViT host's default targets
  ``blocks.N.attn.qkv|proj`` and ``blocks.N.mlp.fc1|fc2``, a trained copy of ``head``), fast path on;
- ``visionpeft lora (fast path off)``: the same, peft's layer forward;
- ``peft lora``: ``get_peft_model(model, LoraConfig(r=8, lora_alpha=8, target_modules=["qkv", "proj",
  "fc1", "fc2"], exclude_modules=["patch_embed.proj"], modules_to_save=["head"]))``. peft matches
  list entries as name suffixes, so without the exclusion it would also adapt the patch embedding's
  convolution, which visionpeft's full-name targets leave alone;
- ``full``: every parameter trained.

A step is zero_grad, forward, cross-entropy, backward, AdamW (lr 1e-4) over the trainable parameters.
The adapted module names and the trainable counts of the two LoRA implementations are compared
and must be equal; ratios are given against full fine-tuning and against peft.
"""

from __future__ import annotations

import argparse
from typing import Any

from harness import Contender, add_common_args, compare, describe, fmt_count, markdown, ratios, resolve_device, table

R = 8
PEFT_TARGETS = ["qkv", "proj", "fc1", "fc2"]
CONTENDERS = ["full", "visionpeft lora", "visionpeft lora (fast path off)", "peft lora"]


def adapted_modules(model: Any) -> list[str]:
    """Names of the modules carrying a LoRA layer, without peft's wrapper prefix."""
    from peft.tuners.lora import LoraLayer

    names = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    return sorted(n.removeprefix("base_model.model.") for n in names)


def adapted_model(name: str, model_name: str, size: int) -> tuple[Any, dict]:
    """The seeded timm model as contender ``name`` trains it, and its info (trainable, adapted modules)."""
    from vit_speed import plain_model, set_fast_lora

    import visionpeft as vp

    model = plain_model(model_name, size)
    info: dict = {}
    if name.startswith("visionpeft"):
        model = vp.attach(model, "lora", r=R)
        info["lora"] = set_fast_lora(model, "fast path off" not in name)
    elif name == "peft lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=R, lora_alpha=R, target_modules=PEFT_TARGETS, exclude_modules=["patch_embed.proj"],
                            modules_to_save=["head"])
        model = get_peft_model(model, config)
    if name != "full":
        info["adapted"] = adapted_modules(model)
    info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, info


def build(name: str, model_name: str, size: int, batch_size: int, device: str) -> tuple[Any, dict]:
    """Contender ``name``'s training step and its info."""
    import torch
    from torch import nn
    from vit_speed import batch

    from visionpeft.method import set_train_mode

    model, info = adapted_model(name, model_name, size)
    model = model.to(device)
    if name.startswith("visionpeft"):
        set_train_mode(model, True)  # visionpeft's mode: frozen backbone in eval (no dropout in this ViT anyway)
    else:
        model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    images, labels = batch(batch_size, size, device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return step, info


def check_same_work(results: dict) -> str:
    """Raise unless both LoRA implementations adapt the same modules and train as many elements."""
    ours, theirs = results["visionpeft lora"].info, results["peft lora"].info
    if ours["adapted"] != theirs["adapted"]:
        only_ours = sorted(set(ours["adapted"]) - set(theirs["adapted"]))
        only_theirs = sorted(set(theirs["adapted"]) - set(ours["adapted"]))
        raise SystemExit(f"the LoRAs adapt different modules: only visionpeft {only_ours}, only peft {only_theirs}")
    if ours["trainable"] != theirs["trainable"]:
        raise SystemExit(f"trainable counts differ: visionpeft {ours['trainable']:,}, peft {theirs['trainable']:,}")
    return (f"both LoRAs adapt the same {len(ours['adapted'])} modules and train {ours['trainable']:,} elements "
            "(head copy included)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args(argv)
    resolve_device(args)
    kwargs = {"model_name": args.model, "size": args.size, "batch_size": args.batch, "device": args.device}
    contenders = [Contender(n, build, {"name": n, **kwargs}) for n in CONTENDERS]
    results = compare(contenders, rounds=args.rounds, warmup=args.warmup, device=args.device, threads=args.threads)
    print(f"\nLoRA r={R}, visionpeft and peft, next to full fine-tuning: {args.model}, batch {args.batch}, "
          f"{args.size} px, fp32, AdamW, {args.device}")
    print(describe(args))
    print(check_same_work(results))
    print(table(results, "full", {"trainable": lambda r: fmt_count(r.info["trainable"])}))
    print("\nagainst peft's LoRA:")
    rows = [[n, f"{median:.3f}", f"{minimum:.3f}"] for n, (median, minimum) in ratios(results, "peft lora").items()]
    print(markdown(["contender", "/ peft lora (median of rounds)", "/ peft lora (of minima)"], rows))
    notes = sorted({r.info["lora"] for r in results.values() if "lora" in r.info})
    print("visionpeft LoRA: " + "; ".join(notes))


if __name__ == "__main__":
    main()
