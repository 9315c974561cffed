"""The public functions of ``import visionpeft as vp``.

Every method goes through these: they check everything before the model changes, apply one
freezing policy, keep the record of attached adapters (keyed by adapter name) and read and write
adapter files.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from torch import nn

from visionpeft import files, inject
from visionpeft.config import MethodConfig
from visionpeft.errors import AdapterError, AdapterMismatchError, ConfigError, UnsupportedModelError
from visionpeft.method import AdapterState, Attachment, Method, get_state, set_state
from visionpeft.registry import MethodInfo, get_method, list_methods


def methods(domain: str | None = None) -> list[MethodInfo]:
    """The registered methods (name, domain, one-line description), optionally of one domain.

    Generic methods (domain ``"core"``) are listed under every domain. Listing imports no
    domain library.
    """
    return list_methods(domain)


def config(name: str, **kwargs: Any) -> MethodConfig:
    """The validated config of method ``name`` with the paper's defaults, overridden by ``kwargs``.

    Unknown keys and bad values raise :class:`~visionpeft.errors.ConfigError` naming the field.
    """
    return get_method(name).Config.from_dict(kwargs)


def _resolve_config(name_or_config: str | MethodConfig, kwargs: Mapping[str, Any]) -> MethodConfig:
    if isinstance(name_or_config, MethodConfig):
        if kwargs:
            raise ConfigError(
                f"pass either a config object or keyword arguments, not both (got {sorted(kwargs)}); "
                "use dataclasses.replace(cfg, ...) to change a config"
            )
        get_method(name_or_config.method)  # the config's method must be registered
        return name_or_config
    return config(name_or_config, **kwargs)


def attach(model: nn.Module, name_or_config: str | MethodConfig, *, name: str = "default", **kwargs: Any) -> nn.Module:
    """Attach an adapter to ``model`` and return the model to use.

    Changes ``model`` in place where the method allows (most do) and freezes the base model's
    parameters; methods that need a new forward return a wrapper holding ``model``. ``name`` keys
    the adapter, so one backbone can carry several; attaching a name twice is an error.
    Everything is checked before the model is touched.
    """
    cfg = _resolve_config(name_or_config, kwargs)
    method_cls = get_method(cfg.method)
    if not isinstance(name, str) or not name.isidentifier():
        raise AdapterError(f"adapter name {name!r} must be a Python identifier, e.g. 'default' or 'task_a'")
    state = get_state(model)
    if state is not None and name in state.adapters:
        other = state.adapters[name].method.name
        raise AdapterError(
            f"an adapter named {name!r} ({other}) is already attached; pass another name "
            f"(vp.attach(model, {cfg.method!r}, name='second')) or vp.detach(model) first"
        )
    if not method_cls.supports(model):
        families = method_cls.supported_families()
        raise UnsupportedModelError(
            f"method {cfg.method!r} cannot adapt a {type(model).__module__}.{type(model).__qualname__}; it "
            f"supports: {', '.join(families) or 'no model family yet (install its domain extra)'}"
        )
    base = state.base if state is not None else files.fingerprint(model)
    owned = _adapter_tensor_ids(model, state)
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    training = inject.training_state(model)

    method: Method = method_cls(cfg, name)
    adapted = method.attach(model)

    for p in adapted.parameters():
        if id(p) not in requires_grad:
            continue  # created by the method, which decides
        if id(p) in owned:
            p.requires_grad_(requires_grad[id(p)])
        elif method_cls.freezes_base:
            p.requires_grad_(False)
    adapters = dict(state.adapters) if state is not None else {}
    adapters[name] = Attachment(method, requires_grad, training)
    if adapted is not model:
        set_state(model, None)
    set_state(adapted, AdapterState(base, adapters))
    return adapted


def _adapter_tensor_ids(model: nn.Module, state: AdapterState | None) -> set[int]:
    if state is None:
        return set()
    return {id(t) for a in state.adapters.values() for t in a.method.trained_tensors(model).values()}


def _require_state(model: nn.Module, action: str) -> AdapterState:
    state = get_state(model)
    if state is None:
        raise AdapterError(f"cannot {action}: no visionpeft adapter is attached to this model")
    return state


def _select(state: AdapterState, name: str | None, action: str) -> list[str]:
    if name is None:
        return list(reversed(state.adapters))
    if name not in state.adapters:
        raise AdapterError(f"cannot {action} {name!r}: attached adapters are {list(state.adapters)}")
    last = list(state.adapters)[-1]
    if name != last:
        raise AdapterError(
            f"cannot {action} {name!r} while {last!r}, attached after it, is still there; {action} "
            "adapters in reverse order"
        )
    return [name]


def detach(model: nn.Module, name: str | None = None) -> nn.Module:
    """Remove adapter ``name`` (default: all, newest first) and return the original model.

    The base model's ``state_dict``, ``requires_grad`` flags and train/eval flags come back
    exactly as they were before :func:`attach`.
    """
    state = _require_state(model, "detach")
    current = model
    for adapter in _select(state, name, "detach"):
        attachment = state.adapters.pop(adapter)
        set_state(current, None)
        current = attachment.method.detach(current)
        for p in current.parameters():
            if id(p) in attachment.requires_grad:
                p.requires_grad_(attachment.requires_grad[id(p)])
        inject.restore_training_state(current, attachment.training)
        set_state(current, AdapterState(state.base, dict(state.adapters)))
    return current


def merge(model: nn.Module) -> nn.Module:
    """Fold every attached adapter into the base weights and return the plain model.

    Only mergeable methods (LoRA, BitFit, SSF, (IA)³, the linear probe) can be merged; if any
    attached adapter is not, nothing changes and :class:`~visionpeft.errors.AdapterError` names it.
    """
    state = _require_state(model, "merge")
    blocked = [f"{n} ({a.method.name})" for n, a in state.adapters.items() if not a.method.mergeable]
    if blocked:
        raise AdapterError(
            f"cannot merge: {', '.join(blocked)} cannot be folded into the base weights; detach "
            "them first (vp.detach(model, name)) or keep the adapter unmerged"
        )
    current = model
    for adapter in list(reversed(state.adapters)):
        attachment = state.adapters.pop(adapter)
        set_state(current, None)
        current = attachment.method.merge(current)
        inject.restore_training_state(current, attachment.training)
        for p in current.parameters():
            p.requires_grad_(attachment.requires_grad.get(id(p), False))
        set_state(current, AdapterState(state.base, dict(state.adapters)))
    return current


class Summary(dict):
    """Parameter counts of an adapted model; ``str()`` gives a table."""

    def __str__(self) -> str:
        rows = [("adapter", "method", "trainable")]
        rows += [(n, m["method"], f"{m['trainable']:,}") for n, m in self["adapters"].items()]
        width = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, width, strict=True)) for r in rows]
        lines.append(
            f"trainable {self['trainable']:,} of {self['total']:,} parameters ({self['trainable_percent']:.4f}%)"
        )
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """Total and trainable parameter counts, and the trained tensors of each attached adapter."""
    total, trainable = inject.count_parameters(model)
    state = get_state(model)
    adapters: dict[str, dict[str, Any]] = {}
    if state is not None:
        for n, a in state.adapters.items():
            tensors = a.method.trained_tensors(model)
            # Saved buffers (a batch-norm head's running statistics) are part of the adapter but do not train.
            count = sum(t.numel() for t in tensors.values() if t.requires_grad or isinstance(t, nn.Parameter))
            adapters[n] = {"method": a.method.name, "trainable": count}
    return Summary(
        total=total,
        trainable=trainable,
        trainable_percent=100.0 * trainable / max(total, 1),
        adapters=adapters,
    )


def save(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> None:
    """Write adapter ``name`` (default: the only one) to ``directory``.

    The folder gets ``adapter_config.json`` (method, config, base-model fingerprint, versions)
    and ``adapter.safetensors`` (only the trained tensors); each file is replaced atomically.
    """
    state = _require_state(model, "save")
    if name is None:
        if len(state.adapters) != 1:
            raise AdapterError(f"several adapters are attached ({list(state.adapters)}); pass name=")
        name = next(iter(state.adapters))
    if name not in state.adapters:
        raise AdapterError(f"no adapter named {name!r}; attached adapters are {list(state.adapters)}")
    method = state.adapters[name].method
    files.write_adapter(
        directory,
        method=method.name,
        adapter_name=name,
        config=method.config.to_dict(),
        base=state.base,
        tensors=method.trained_tensors(model),
    )


def load(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Attach the adapter saved in ``directory`` to ``model`` and load its tensors.

    The base model's fingerprint and every tensor shape are checked first; on any mismatch
    ``model`` is left as it was and :class:`~visionpeft.errors.AdapterMismatchError` says what
    differs. Returns the model to use, as :func:`attach` does.
    """
    payload, tensors = files.read_adapter(directory)
    state = get_state(model)
    base = state.base if state is not None else files.fingerprint(model)
    difference = files.explain_mismatch(payload["base_model"], base)
    if difference is not None:
        raise AdapterMismatchError(
            f"the adapter in {directory} was trained for another base model ({difference}); load it onto "
            f"the model it was trained with ({payload['base_model'].get('family')})"
        )
    cfg = get_method(payload["method"]).Config.from_dict(payload["config"])
    adapter_name = name or payload["adapter_name"]
    adapted = attach(model, cfg, name=adapter_name)
    try:
        get_state(adapted).adapters[adapter_name].method.load_trained_tensors(adapted, tensors)
    except Exception:
        detach(adapted, adapter_name)
        raise
    return adapted
