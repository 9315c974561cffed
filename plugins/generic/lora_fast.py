"""A faster training step for peft's LoRA linear layers: one GEMM with the merged weight.

peft computes an adapted linear layer as ``W x + s * B (A x)``: besides the frozen GEMM, each
layer runs two skinny rank-r products forward and four backward, and full-size elementwise work
(the ``* s``, the add, and in backward the sum of the two input gradients). While training, the
same function can be computed as ``(W + s B A) x``:

- forward: form the merged weight (an ``r``-deep product, tiny next to the GEMM over the batch)
  and run one GEMM;
- backward: one GEMM for the input gradient, with the merged weight formed again rather than kept;
  the gradients of ``A`` and ``B`` from four skinny products, ``s (g B)^T x`` and ``s g^T (x A^T)``;
  no full-size elementwise op.

Only the layer input is saved for backward (peft also keeps ``A x``). The parameters, their names
and every file stay peft's: :func:`enable` only changes the class of the layer objects to a
subclass whose ``forward`` takes this path when it applies, and :func:`disable` changes it back.

The path applies to a ``peft.tuners.lora.Linear`` over a plain ``nn.Linear`` with a frozen weight,
while gradients are enabled, with exactly one active adapter that is vanilla LoRA (no DoRA or
other variant, no LoRA bias) with no dropout in effect (``p = 0`` or the dropout module in eval
mode), not merged, not disabled, with no ``adapter_names`` mixed batch, no forward hooks on the
layer's parts (nor global ones), no forward-mode AD tangents,
input and weights all fp32 (or fp64) at full matmul precision (in bf16, fp16 or TF32 the merged
weight would round small updates away), and a batch with rows enough to pay for forming the
merged weight (:data:`MIN_ROWS_FACTOR`). Everywhere else, including conv and embedding layers,
low-precision training and evaluation without gradients, peft's own ``forward`` runs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class MergedLoRALinear(torch.autograd.Function):
    """``F.linear(x, W + s B A, bias)`` with gradients for ``x``, ``bias``, ``A`` and ``B`` (``W`` is frozen)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_a: torch.Tensor,
                lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
        merged = torch.addmm(weight, lora_b, lora_a, alpha=scaling)
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, lora_a, lora_b = ctx.saved_tensors
        scaling = ctx.scaling
        needs_x, _, needs_bias, needs_a, needs_b, _ = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_bias = grad_a = grad_b = None
        if needs_x:
            grad_x = (g @ torch.addmm(weight, lora_b, lora_a, alpha=scaling)).view(x.shape)
        if needs_bias:
            grad_bias = g.sum(0)
        if needs_a or needs_b:
            flat_x = x.reshape(-1, x.shape[-1])
            if needs_a:
                g_b = g @ lora_b  # (N, r)
                grad_a = g_b.t() @ flat_x
                if scaling != 1:
                    grad_a.mul_(scaling)
            if needs_b:
                x_a = flat_x @ lora_a.t()  # (N, r)
                grad_b = (x_a.t() @ g).t()  # measured about 2x faster than g.t() @ x_a on CPU
                if scaling != 1:
                    grad_b.mul_(scaling)
        return grad_x, None, grad_bias, grad_a, grad_b, None


def _no_dropout(dropout: nn.Module) -> bool:
    return isinstance(dropout, nn.Identity) or not dropout.training or getattr(dropout, "p", 1.0) == 0


def _single_adapter(layer: nn.Module) -> str | None:
    """The one vanilla LoRA adapter the fast path can compute for this layer now, or ``None``."""
    if layer.disable_adapters or layer.merged or getattr(layer, "fan_in_fan_out", False):
        return None
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
        return None
    if layer.lora_B[name].bias is not None or not _no_dropout(layer.lora_dropout[name]):
        return None
    base = layer.base_layer
    if type(base) is not nn.Linear or base.weight.requires_grad or hasattr(base, "_hf_hook"):
        return None
    if _hooked(base, layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]):
        return None
    return name


#: The path applies to a call with at least this many times ``in * out / (in + out)`` rows (tokens
#: in the batch). Forming ``W + s B A`` reads and writes a weight-sized matrix twice per step,
#: while peft's extra work grows with the rows; on CPU (one thread, r = 4 and 8) the two cost the
#: same at about 1.3-1.6 times that ratio: ViT-S/16 at batch 8 (1,576 rows) gains, Stable
#: Diffusion's attention at 16x16 latents (64-256 rows, 77 for the text keys) would lose.
MIN_ROWS_FACTOR = 1.5


def enough_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a call of ``x`` on ``weight`` has rows enough for the merged weight to pay (:data:`MIN_ROWS_FACTOR`)."""
    out_features, in_features = weight.shape
    rows = x.numel() // max(x.shape[-1], 1)
    return rows * (in_features + out_features) >= MIN_ROWS_FACTOR * in_features * out_features


def _full_precision(x: torch.Tensor, tensors: list[torch.Tensor]) -> bool:
    """Whether the layer computes in fp32 or fp64 at full matmul precision.

    In bf16, fp16 or TF32, ``W + s B A`` is rounded to the weight's few mantissa bits, which would
    erase an update smaller than ``W``'s rounding step (early in training, all of them); peft's
    separate low-rank branch keeps it. So low-precision autocast, half-precision weights and a
    float32 matmul precision below "highest" take peft's forward.
    """
    if torch.is_autocast_enabled(x.device.type) and torch.get_autocast_dtype(x.device.type) not in (
            torch.float32, torch.float64):
        return False
    if x.dtype not in (torch.float32, torch.float64) or any(t.dtype != x.dtype for t in tensors):
        return False
    if x.dtype == torch.float64:
        return True
    try:
        return torch.get_float32_matmul_precision() == "highest"
    except RuntimeError:
        # Precision set through the per-backend API (``torch.backends.*.fp32_precision``), which the
        # legacy query refuses to summarise: peft's forward is right at any precision.
        return False


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook would run on any of ``modules`` (the path calls none of their forwards)."""
    from torch.nn.modules import module as module_state

    if getattr(module_state, "_global_forward_hooks", None) or getattr(module_state, "_global_forward_pre_hooks", None):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def _dual(*tensors: torch.Tensor) -> bool:
    """Whether forward-mode AD carries a tangent on any of ``tensors`` (the function defines no ``jvp``)."""
    from torch.autograd.forward_ad import unpack_dual

    return any(unpack_dual(t).tangent is not None for t in tensors)


def fast_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output through :class:`MergedLoRALinear`, or ``None`` when the path does not apply."""
    if not torch.is_grad_enabled():
        return None
    name = _single_adapter(layer)
    if name is None:
        return None
    base = layer.base_layer
    weight, bias = base.weight, base.bias
    lora_a, lora_b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if not (lora_a.requires_grad or lora_b.requires_grad or x.requires_grad):
        return None
    tensors = [weight, lora_a, lora_b] + ([bias] if bias is not None else [])
    if not enough_rows(x, weight) or not _full_precision(x, tensors) or _dual(x, *tensors):
        return None
    with torch.autocast(x.device.type, enabled=False):
        return MergedLoRALinear.apply(x, weight, bias, lora_a, lora_b, float(layer.scaling[name]))


def _fast_class(base_class: type) -> type:
    """The subclass of peft's ``lora.Linear`` whose ``forward`` tries the merged-weight path first."""

    def forward(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs:
            out = fast_forward(self, x)
            if out is not None:
                return out
        return base_class.forward(self, x, *args, **kwargs)

    return type(base_class.__name__, (base_class,), {
        "forward": forward, "__module__": __name__, "__qualname__": base_class.__qualname__,
        "_visionpeft_fast_base": base_class,
    })


def _peft_linear() -> type:
    from peft.tuners.lora.layer import Linear

    return Linear


_FAST: dict[type, type] = {}


def fast_class() -> type:
    """The fast subclass of ``peft.tuners.lora.Linear`` (built once, so pickling finds it by name)."""
    base = _peft_linear()
    if base not in _FAST:
        _FAST[base] = _fast_class(base)
    return _FAST[base]


def __getattr__(name: str) -> Any:
    # Pickle finds the fast class by its module and name, ``visionpeft.generic.lora_fast.Linear``.
    if name == "Linear":
        return fast_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _swap_class(model: nn.Module, old: type, new: type) -> int:
    changed = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            changed += 1
    return changed


def enable(model: nn.Module) -> int:
    """Give every peft LoRA ``Linear`` in ``model`` the merged-weight training path; the number of layers changed."""
    return _swap_class(model, _peft_linear(), fast_class())


def disable(model: nn.Module) -> int:
    """Give every fast layer in ``model`` peft's own ``forward`` back; the number of layers changed."""
    return _swap_class(model, fast_class(), _peft_linear())


def is_fast(module: nn.Module) -> bool:
    """Whether ``module`` is a peft LoRA ``Linear`` with the merged-weight training path."""
    return type(module) is fast_class()
