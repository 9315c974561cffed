"""``visionpeft export lora``: convert a Stable Diffusion LoRA between visionpeft, diffusers and kohya files.

::

    visionpeft export lora --adapter runs/dog/adapter --format kohya [--output dog.safetensors]
    visionpeft export lora --adapter lora_kohya.safetensors --format diffusers --output out/

``--adapter`` is a visionpeft adapter folder (or the run folder holding ``adapter/``), a folder with
``pytorch_lora_weights.safetensors``, or a diffusers or kohya ``.safetensors`` file (told apart by
its keys). Alpha is carried over exactly in both directions.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from visionpeft.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="visionpeft export lora",
        description="Write a Stable Diffusion LoRA in kohya (ComfyUI, AUTOMATIC1111) or diffusers format.",
    )
    parser.add_argument("--adapter", required=True,
                        help="visionpeft adapter folder or run folder, diffusers LoRA folder, or a LoRA .safetensors")
    parser.add_argument("--format", required=True, choices=["kohya", "diffusers"], help="the format to write")
    parser.add_argument("--output", help="the file (.safetensors) or folder to write; default: beside the input")
    return parser


def _source(path: Path) -> Path:
    from visionpeft.files import CONFIG_NAME

    if path.is_dir() and not (path / CONFIG_NAME).is_file() and (path / "adapter" / CONFIG_NAME).is_file():
        return path / "adapter"
    return path


def main(argv: Sequence[str]) -> int:
    """Convert ``--adapter`` into ``--format``; print the written path; return the exit status."""
    from visionpeft.diffusion import lora_export
    from visionpeft.files import CONFIG_NAME

    args = _parser().parse_args(list(argv))
    source = _source(Path(args.adapter))
    if not source.exists():
        raise ConfigError(f"--adapter: {source} does not exist")
    weights = lora_export.read_lora_file(source)
    name = lora_export.KOHYA_WEIGHT_NAME if args.format == "kohya" else lora_export.DIFFUSERS_WEIGHT_NAME
    if args.output is not None:
        output = Path(args.output)
    elif source.is_dir() and (source / CONFIG_NAME).is_file():
        output = source.parent / name
    else:
        output = (source if source.is_dir() else source.parent) / name
    target = output if output.suffix == ".safetensors" else output / name
    if source.is_file() and target.resolve() == source.resolve():
        raise ConfigError(f"--output: {target} is the input file; give another --output")
    if args.format == "kohya":
        written = lora_export.save_kohya(weights, output)
    else:
        written = lora_export.save_diffusers(weights, output)
    print(written)
    return 0
