"""BitFit (Ben Zaken et al., 2022): train only the bias terms (and the task head).

Each selected bias gets a zero-initialised delta through a parametrization
(:class:`~visionpeft.modules.AddDelta`), so the gradient is exactly that of training the bias
itself, while the original tensor stays intact for :func:`visionpeft.detach`. The adapter file
holds the deltas (``<module>.bias.delta``); merging adds them into the biases.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn
from torch.nn.utils import parametrize

from visionpeft.config import MethodConfig, field
from visionpeft.errors import ConfigError, NoMatchError
from visionpeft.head import attach_head, detach_head, head_modules, head_tensors, merge_head
from visionpeft.hosts import find_host
from visionpeft.method import Method, get_state
from visionpeft.modules import AddDelta, TrainableCopy


@dataclasses.dataclass
class BitFitConfig(MethodConfig):
    """Which biases BitFit trains; by default every parameter whose name ends in ``bias``."""

    bias_pattern: str = field(
        r"(.*\.)?[a-z_]*bias", help="full-match pattern over parameter names selecting the biases to train"
    )
    train_head: bool = field(True, help="train a copy of the host's classification head, if it has one")

    def check(self) -> None:
        try:
            re.compile(self.bias_pattern)
        except re.error as err:
            raise ConfigError(
                f"bitfit.bias_pattern: {self.bias_pattern!r} is not a regular expression ({err})"
            ) from err


class BitFit(Method):
    """Trains the bias terms of a frozen model through additive deltas."""

    name = "bitfit"
    domain = "core"
    description = "BitFit: train only the bias terms (plus the task head) of any host; mergeable"
    Config = BitFitConfig
    mergeable = True
    starts_as_identity = True
    _head: str | None = None
    _targets: tuple[tuple[str, str], ...] = ()

    def _select(self, model: nn.Module, head: str | None, untrained: tuple[str, ...] = ()) -> list[tuple[str, str]]:
        state = get_state(model)
        owned = set()
        if state is not None:
            owned = {id(t) for a in state.adapters.values() for t in a.method.trained_tensors(model).values()}
        rx = re.compile(self.config.bias_pattern)
        selected = []
        for mname, module in model.named_modules():
            if isinstance(module, (TrainableCopy, AddDelta)):
                continue
            if head is not None and (mname == head or mname.startswith(head + ".")):
                continue
            if any(mname == u or mname.startswith(u + ".") for u in untrained):
                continue
            names = list(module._parameters)
            if parametrize.is_parametrized(module):
                names += [n for n, plist in module.parametrizations.items() if isinstance(plist[0], AddDelta)]
            for pname in names:
                if not parametrize.is_parametrized(module, pname):
                    p = module._parameters.get(pname)
                    if p is None or id(p) in owned:
                        continue
                if rx.fullmatch(f"{mname}.{pname}" if mname else pname):
                    selected.append((mname, pname))
        if not selected:
            raise NoMatchError(f"bitfit.bias_pattern {self.config.bias_pattern!r} matched no parameter")
        return selected

    def attach(self, model: nn.Module) -> nn.Module:
        host = find_host(model)
        head = host.head if self.config.train_head else None
        self._targets = tuple(self._select(model, head, tuple(host.untrained)))
        self._head = head
        for mname, pname in self._targets:
            module = model.get_submodule(mname)
            if not (parametrize.is_parametrized(module, pname) and isinstance(
                module.parametrizations[pname][0], AddDelta
            )):
                parametrize.register_parametrization(module, pname, AddDelta(), unsafe=True)
            plist = module.parametrizations[pname]
            plist[0].add(self.adapter_name, plist.original)
        if head is not None:
            attach_head(model, head, self.adapter_name)
        return model

    def _drop(self, model: nn.Module, fold: bool) -> None:
        for mname, pname in self._targets:
            module = model.get_submodule(mname)
            plist = module.parametrizations[pname]
            if fold:
                with torch.no_grad():
                    plist.original.add_(plist[0].deltas[self.adapter_name].to(plist.original.dtype))
            plist[0].remove(self.adapter_name)
            if not plist[0].deltas:
                parametrize.remove_parametrizations(module, pname, leave_parametrized=False)

    def detach(self, model: nn.Module) -> nn.Module:
        self._drop(model, fold=False)
        if self._head is not None:
            detach_head(model, self._head, self.adapter_name)
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        self._drop(model, fold=True)
        if self._head is not None:
            merge_head(model, self._head, self.adapter_name)
        return model

    def train_modules(self, model: nn.Module) -> list[nn.Module] | None:
        if not find_host(model).frozen_backbone_eval:
            return None
        return head_modules(model, self._head)

    def trained_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        tensors = {}
        for mname, pname in self._targets:
            delta = model.get_submodule(mname).parametrizations[pname][0].deltas[self.adapter_name]
            tensors[f"{mname}.{pname}.delta" if mname else f"{pname}.delta"] = delta
        if self._head is not None:
            tensors.update(head_tensors(model, self._head, self.adapter_name))
        return tensors
