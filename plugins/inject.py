"""Injection primitives that every method uses for module surgery.

The matching rule, the only one in visionpeft: a pattern is a regular expression that must match
a module's whole qualified name (``re.fullmatch``). An exact name is its own pattern. A list of
patterns matches what any of them matches. There is no suffix matching, so ``"proj"`` never
catches ``patch_embed.proj``; write ``r"blocks\\.\\d+\\.attn\\.proj"``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from visionpeft.errors import NoMatchError


def _compile(patterns: str | Sequence[str]) -> list[tuple[str, re.Pattern[str]]]:
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise NoMatchError(f"a module pattern is a string, got {p!r}")
        try:
            compiled.append((p, re.compile(p)))
        except re.error as err:
            raise NoMatchError(f"module pattern {p!r} is not a valid regular expression: {err}") from err
    return compiled


def match_modules(
    model: nn.Module, patterns: str | Sequence[str], types: tuple[type, ...] | None = None
) -> dict[str, list[str]]:
    """Dry run: for each pattern, the qualified module names it matches (in model order).

    ``types`` keeps only modules that are instances of these classes. Nothing is changed.
    """
    compiled = _compile(patterns)
    found: dict[str, list[str]] = {p: [] for p, _ in compiled}
    for name, module in model.named_modules():
        if not name or (types is not None and not isinstance(module, types)):
            continue
        for p, rx in compiled:
            if rx.fullmatch(name):
                found[p].append(name)
    return found


def find_modules(
    model: nn.Module, patterns: str | Sequence[str], types: tuple[type, ...] | None = None
) -> list[str]:
    """The qualified names of the modules matched by ``patterns``, in model order.

    Raises :class:`NoMatchError` when a pattern matches nothing, naming it and the closest
    module names, because a silent no-op adapter is worse than an error.
    """
    found = match_modules(model, patterns, types)
    empty = [p for p, names in found.items() if not names]
    if empty:
        names = [n for n, m in model.named_modules() if n and (types is None or isinstance(m, types))]
        hints = {p: difflib.get_close_matches(p, names, n=3, cutoff=0.4) for p in empty}
        detail = "; ".join(f"{p!r} (closest: {', '.join(h) or 'none'})" for p, h in hints.items())
        kind = f" of type {'/'.join(t.__name__ for t in types)}" if types else ""
        raise NoMatchError(
            f"module pattern(s) matched no module{kind}: {detail}. Patterns must match the whole "
            "qualified name (re.fullmatch); list candidates with visionpeft.inject.match_modules"
        )
    matched = {n for names in found.values() for n in names}
    return [n for n, _ in model.named_modules() if n in matched]


def describe_matches(model: nn.Module, patterns: str | Sequence[str]) -> str:
    """A readable dry-run report: each pattern and the modules it would adapt."""
    lines = []
    for p, names in match_modules(model, patterns).items():
        lines.append(f"{p!r}: {len(names)} module(s)")
        lines.extend(f"  {n} ({type(model.get_submodule(n)).__name__})" for n in names)
    return "\n".join(lines)


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


@dataclass
class Replacement:
    """A record of one module swap, which :meth:`restore` undoes."""

    model: nn.Module
    name: str
    original: nn.Module
    replacement: nn.Module

    def restore(self) -> None:
        """Put the original module back in place of the replacement."""
        parent, child = _parent(self.model, self.name)
        current = getattr(parent, child)
        if current is not self.replacement:
            raise RuntimeError(
                f"cannot restore {self.name!r}: it was replaced again after this adapter was attached; "
                "detach adapters in reverse order"
            )
        setattr(parent, child, self.original)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> Replacement:
    """Replace the submodule at ``name`` with ``new`` and return a record that can restore it."""
    parent, child = _parent(model, name)
    original = getattr(parent, child)
    setattr(parent, child, new)
    return Replacement(model, name, original, new)


def freeze(module: nn.Module) -> None:
    """Turn off gradients for every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(False)


def unfreeze(module: nn.Module) -> None:
    """Turn on gradients for every parameter of ``module``."""
    for p in module.parameters():
        p.requires_grad_(True)


def requires_grad_state(model: nn.Module) -> dict[str, bool]:
    """A snapshot of every parameter's ``requires_grad`` flag, by qualified name."""
    return {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}


def restore_requires_grad(model: nn.Module, state: dict[str, bool]) -> None:
    """Restore flags taken by :func:`requires_grad_state` (parameters added since are left alone)."""
    for n, p in model.named_parameters(remove_duplicate=False):
        if n in state:
            p.requires_grad_(state[n])


def training_state(model: nn.Module) -> dict[str, bool]:
    """A snapshot of every submodule's train/eval flag."""
    return {n: m.training for n, m in model.named_modules()}


def restore_training_state(model: nn.Module, state: dict[str, bool]) -> None:
    """Restore flags taken by :func:`training_state`."""
    for n, m in model.named_modules():
        if n in state:
            m.training = state[n]


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """``(total, trainable)`` parameter counts; shared parameters are counted once."""
    total = trainable = 0
    for p in module.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def trainable_parameters(module: nn.Module) -> Iterable[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs that require gradients."""
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)
