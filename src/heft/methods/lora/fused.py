"""A LoRA linear layer for training in one autograd function: fewer dispatched ops than peft's module.

peft's `lora.Linear.forward` is, per adapted layer and step, the base GEMM plus a chain of small ops:
under bf16 autocast the input, A and B are cast separately, the dropout takes four ops on the CPU
(one on CUDA), the low-rank path two GEMMs, a scale and an add, and autograd records each of them.
At small batches a GPU step is bound by the host's cost per dispatched op (~20 µs), and an
all-linear adapter has 210 such layers in smollm2-135m. Here the forward is three ops (dropout, the
down-projection, the base GEMM, the up-projection added in place) and the backward five GEMM-sized
ops plus one mask multiply-add. A and B of every layer come from one flat low-precision copy made
once per forward (`flat_weights`), with the LoRA scale folded into A, so no layer casts its weights.

Only the training forward changes: peft's modules, parameter names and state dicts stay as they
are, so saving, loading, merging and evaluation remain peft's. Layers this cannot fuse (DoRA,
several active adapters, a non-`nn.Linear` base such as a quantized one, LoRA bias, fan-in-fan-out
weights) run peft's own forward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import peft
import torch
from torch import nn

from heft.methods.lora.model import MaskBitsDropout


@dataclass
class LoraWeights:
    """One layer's adapter weights for the fused forward, in the compute dtype: A (r × in), B (out × r)
    and the LoRA scale; views of the flat copy, through which gradients reach peft's parameters."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def fusable(module: nn.Module, name: str) -> bool:
    """Whether `module` is a peft LoRA linear whose training forward is exactly `FusedLoraLinear`
    with adapter `name` as its only active one."""
    return (
        isinstance(module, peft.tuners.lora.Linear)
        and list(module.active_adapters) == [name]
        and name in module.lora_A
        and name not in module.lora_variant
        and not module.merged
        and not module.disable_adapters
        and not module.fan_in_fan_out
        and type(module.get_base_layer()) is nn.Linear
        and module.lora_B[name].bias is None
        and not module.get_base_layer().weight.requires_grad
        and type(module.lora_dropout[name]) in (nn.Dropout, nn.Identity, MaskBitsDropout)
    )


def flat_weights(modules: Sequence[nn.Module], name: str, dtype: torch.dtype) -> list[LoraWeights]:
    """A and B of every layer in `dtype`, as views of one tensor made by two ops (concatenate, cast):
    peft's per-layer casts, once for all layers. Autograd splits the gradient back onto each layer's
    float32 parameters. Parameters already in `dtype` are used as they are."""
    tensors = [m.lora_A[name].weight for m in modules] + [m.lora_B[name].weight for m in modules]
    if any(t.dtype != dtype for t in tensors):
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(dtype)
        tensors = [part.view(t.shape) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    n = len(modules)
    return [LoraWeights(a, b, float(m.scaling[name])) for m, a, b in zip(modules, tensors[:n], tensors[n:])]


def draw_dropout(dropout: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """(dropped-out x, keep mask or None, the scale of kept values): the draws of the layer's own dropout
    module (nn.Dropout through `native_dropout`, one op and the same mask; MaskBitsDropout's bits)."""
    p = getattr(dropout, "p", 0.0)
    if not dropout.training or p == 0:
        return x, None, 1.0
    if isinstance(dropout, MaskBitsDropout) and x.device.type == "cpu":
        keep, scale = dropout.keep_mask(x)
        return x * keep.to(x.dtype).mul_(scale), keep, scale
    dropped, keep = torch.native_dropout(x, p, True)
    return dropped, keep, 1 / (1 - p)


class FusedLoraLinear(torch.autograd.Function):
    """y = x Wᵀ (+ bias) + scale · dropout(x) Aᵀ Bᵀ: the base layer frozen, gradients for x, A and B."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale: float, dropout: nn.Module):
        x2 = x.reshape(-1, x.shape[-1])
        dtype = lora_a.dtype
        x2, weight = x2.to(dtype), weight.to(dtype)
        dropped, keep, keep_scale = draw_dropout(dropout, x2)
        down = dropped @ lora_a.mT
        y = x2 @ weight.mT if bias is None else torch.addmm(bias.to(dtype), x2, weight.mT)
        y.addmm_(down, lora_b.mT, alpha=scale)
        ctx.save_for_backward(weight, lora_a, lora_b, dropped, keep, down)
        ctx.scale, ctx.keep_scale = scale, keep_scale
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        weight, lora_a, lora_b, dropped, keep, down = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        # beta=0: the first argument only gives the shape; the scale rides on the GEMM (one op, not two)
        grad_down = torch.addmm(down, g, lora_b, beta=0, alpha=ctx.scale)
        grad_b = torch.addmm(lora_b, g.mT, down, beta=0, alpha=ctx.scale)
        grad_a = grad_down.mT @ dropped
        grad_x = None
        if ctx.needs_input_grad[0]:
            if keep is None:
                grad_x = torch.addmm(g @ weight, grad_down, lora_a)
            else:
                grad_x = (g @ weight).addcmul_(grad_down @ lora_a, keep, value=ctx.keep_scale)
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1])
        return grad_x, None, None, grad_a, grad_b, None, None


def fused_forward(module: nn.Module, weights: LoraWeights, name: str, x: torch.Tensor) -> torch.Tensor:
    base = module.get_base_layer()
    dropout = module.lora_dropout[name]
    return FusedLoraLinear.apply(x, base.weight, base.bias, weights.a, weights.b, weights.scale, dropout)


def compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype peft's forward would multiply in: autocast's when it is on, the parameters' otherwise."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


@contextlib.contextmanager
def fused_lora_training(layers: Iterable[nn.Module], name: str) -> Iterator[int]:
    """Inside the block, every fusable one of `layers` runs `FusedLoraLinear` for adapter `name` (yields
    how many); peft's forward is back on exit. For training forwards: the flat weight copy is taken on
    entry, so the parameters must not change inside the block (they do not during a forward pass)."""
    modules = [m for m in layers if fusable(m, name)]
    if not modules:
        yield 0
        return
    params = modules[0].lora_A[name].weight
    dtype = compute_dtype(params.device, params.dtype)
    weights = flat_weights(modules, name, dtype)
    last_cast: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for module, w in zip(modules, weights):
            module.forward = _bound(module, w, name, last_cast)
        yield len(modules)
    finally:
        for module in modules:
            module.__dict__.pop("forward", None)


def _bound(module: nn.Module, weights: LoraWeights, name: str, last_cast: list):
    """`module`'s fused forward. Layers reading the same input (q, k, v; gate, up) share its cast to the
    compute dtype (`last_cast`: the last input and its cast), as autocast would cast it once per layer."""

    def forward(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # peft's extra arguments (adapter_names, variants) and, without autocast, dtypes peft would mix
        # (a bfloat16 model with float32 adapters): its own forward
        dtype = weights.a.dtype
        if args or kwargs or not (torch.is_autocast_enabled(x.device.type) or x.dtype == dtype):
            return type(module).forward(module, x, *args, **kwargs)
        if x.dtype != dtype:
            if not last_cast or last_cast[0][0] is not x:
                last_cast[:] = [(x, x.to(dtype))]
            x = last_cast[0][1]
        return fused_forward(module, weights, name, x)

    return forward
