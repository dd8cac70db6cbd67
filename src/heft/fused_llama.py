"""Llama decoder layers for training in fewer dispatched ops: the same computation as transformers' layers.

At small batches a GPU training step is bound by the host's cost per dispatched op (~20 µs each),
and transformers' Llama layer dispatches about 120 per layer and step besides its GEMMs: RMSNorm is
six elementwise ops forward and sixteen backward under autograd, the rotary embedding rotates q and
k through slices, a negation and a concatenation (then computes in float32, because its cos and sin
follow the float32 residual stream, and SDPA casts the result back), and every projection casts the
normalised input to bf16 again. Here RMSNorm and the rotary embedding are autograd functions with
hand-written backwards (four ops and three per tensor), the normalised states are cast once, and
attention is causal SDPA without a mask.

Only for training forwards of right-padded batches (`HeftModel.forward` checks), where the causal mask
alone is exact, and only for the layers `fusable_layers` recognises; the weights, modules, hooks
(ReFT's interventions) and state dicts are transformers' own, and evaluation runs transformers' code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, LlamaMLP, LlamaRMSNorm


def row_dot(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor:
    """bias + scale · Σ a·b over the last axis, kept as an axis of 1: one batched GEMM instead of the
    product and the sum (two ops) that `vecdot` and `pow(2).mean()` dispatch."""
    rows, cols = a.reshape(-1, 1, a.shape[-1]), b.reshape(-1, b.shape[-1], 1)
    with torch.autocast(a.device.type, enabled=False):  # a sum of squares, not to be rounded to bf16
        out = rows @ cols if bias is None else torch.baddbmm(bias, rows, cols, alpha=scale)
    return out.view(*a.shape[:-1], 1)


class ResidualRMSNorm(torch.autograd.Function):
    """(x, weight · x / √(mean(x²) + eps)): the residual stream passed through, and its norm in `dtype`
    (the dtype the next GEMMs read).

    The residual stream x feeds both the norm and the residual add after the block; passing it through
    here lets the backward add the two gradients inside its last op instead of autograd adding them."""

    @staticmethod
    def forward(ctx, x, weight, eps: torch.Tensor, dtype: torch.dtype):
        ctx.set_materialize_grads(False)
        rstd = row_dot(x, x, eps, 1 / x.shape[-1]).rsqrt_()
        normed = x * rstd
        ctx.save_for_backward(normed, rstd, weight)
        return x.view_as(x), (weight * normed).to(dtype)

    @staticmethod
    def backward(ctx, grad_residual, grad):
        if grad is None:
            return grad_residual, None, None, None
        normed, rstd, weight = ctx.saved_tensors
        grad_normed = grad * weight
        # d/dx of x·rstd: rstd · (g − x̂ · mean(g x̂)), with g the gradient reaching x̂ = x · rstd
        mean = row_dot(grad_normed, normed)
        inner = torch.addcmul(grad_normed, normed, mean, value=-1 / normed.shape[-1])
        grad_x = inner.mul_(rstd) if grad_residual is None else torch.addcmul(grad_residual, inner, rstd)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed).flatten(0, -2).sum(0).to(weight.dtype)
        return grad_x, grad_weight, None, None


class RotaryFunction(torch.autograd.Function):
    """x · cos + rotate_half(x) · sin, as x · cos + roll(x) · (±sin): three ops each way, no slices.

    rotate_half(x) = cat(−x₂, x₁) is the roll of x by half its width with the first half negated, so
    with s = sin with its first half negated, the product is roll(x) · s, and its gradient
    roll(g · s) = roll(g) · roll(s)."""

    @staticmethod
    def forward(ctx, x, cos, signed_sin, rolled_sin):
        ctx.save_for_backward(cos, rolled_sin)
        return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)

    @staticmethod
    def backward(ctx, grad):
        cos, rolled_sin = ctx.saved_tensors
        return torch.addcmul(grad * cos, grad.roll(grad.shape[-1] // 2, -1), rolled_sin), None, None, None


def rotary_tables(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The model's cos and sin (batch, seq, head_dim) as `RotaryFunction` reads them, with a head axis."""
    half = cos.shape[-1] // 2
    sign = torch.ones(cos.shape[-1], dtype=sin.dtype, device=sin.device)
    sign[:half] = -1
    signed = (sin * sign).to(dtype)
    return cos.to(dtype).unsqueeze(1), signed.unsqueeze(1), signed.roll(half, -1).unsqueeze(1)


def fusable_layers(layers: Sequence[nn.Module]) -> bool:
    """Whether every layer is a Llama decoder layer this module computes exactly as transformers does
    (and all norms share one epsilon)."""
    return bool(layers) and all(
        type(layer) is LlamaDecoderLayer
        and type(layer.self_attn) is LlamaAttention
        and type(layer.mlp) is LlamaMLP
        and type(layer.input_layernorm) is type(layer.post_attention_layernorm) is LlamaRMSNorm
        and layer.input_layernorm.variance_epsilon
        == layer.post_attention_layernorm.variance_epsilon
        == layers[0].input_layernorm.variance_epsilon
        and layer.mlp.config.hidden_act == "silu"
        for layer in layers
    )


@dataclass
class PassTables:
    """What every layer of one forward pass reads: the rotary tables (`rotary_tables`), the norms'
    epsilon as a tensor, and the dtype the GEMMs run in (autocast's, else the hidden states')."""

    rotary: tuple[torch.Tensor, ...]
    eps: torch.Tensor
    dtype: torch.dtype


def attention(attn: LlamaAttention, x: torch.Tensor, rotary: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Causal self-attention of a batch without padding mask: q, k rotated, SDPA with `is_causal` and
    grouped-query heads (the mask-free call that lets SDPA choose its flash kernel)."""
    batch, seq = x.shape[:2]
    q, k, v = (
        proj(x).view(batch, seq, -1, attn.head_dim).transpose(1, 2) for proj in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    q, k = RotaryFunction.apply(q, *rotary), RotaryFunction.apply(k, *rotary)
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        dropout_p=attn.attention_dropout if attn.training else 0.0,
        is_causal=True,
        scale=attn.scaling,
        enable_gqa=attn.num_key_value_groups > 1,
    )
    return attn.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


def layer_forward(layer: LlamaDecoderLayer, hidden: torch.Tensor, tables: PassTables) -> torch.Tensor:
    """transformers' LlamaDecoderLayer.forward for a causal batch without cache."""
    hidden, normed = ResidualRMSNorm.apply(hidden, layer.input_layernorm.weight, tables.eps, tables.dtype)
    hidden = hidden + attention(layer.self_attn, normed, tables.rotary)
    hidden, normed = ResidualRMSNorm.apply(hidden, layer.post_attention_layernorm.weight, tables.eps, tables.dtype)
    mlp = layer.mlp
    return hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(normed)) * mlp.up_proj(normed))


@contextlib.contextmanager
def fused_decoder_layers(layers: Sequence[nn.Module]) -> Iterator[None]:
    """Inside the block, each layer's `forward` is `layer_forward` (transformers' own on exit). The layers
    must be called as transformers' decoder calls them, without an attention mask or cache."""
    current: list[tuple[torch.Tensor, PassTables]] = []  # the model's cos of this pass, and the tables
    eps = layers[0].input_layernorm.variance_epsilon

    def bound(layer: nn.Module):
        def forward(hidden: torch.Tensor, attention_mask=None, cache=None, position_embeddings=None, **kwargs):
            if attention_mask is not None or cache is not None:
                raise ValueError("the fused Llama layers compute causal attention without a mask or cache")
            cos, sin = position_embeddings
            if not current or current[0][0] is not cos:  # once per forward pass, for every layer
                device = cos.device.type
                dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
                eps_tensor = torch.full((), eps, dtype=hidden.dtype, device=hidden.device)
                current[:] = [(cos, PassTables(rotary_tables(cos, sin, dtype), eps_tensor, dtype))]
            return layer_forward(layer, hidden, current[0][1])

        return forward

    try:
        for layer in layers:
            layer.forward = bound(layer)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
