"""Llama layers in fewer ops (`heft.fused_llama`) against transformers' own modules and layers."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from conftest import make_model
from heft.fused_llama import ResidualRMSNorm, RotaryFunction, fusable_layers, fused_decoder_layers, rotary_tables


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max()).detach())


def test_residual_rms_norm_equals_transformers_norm_with_gradients():
    """The norm and its gradients; the passed-through residual's gradient is added to the norm's."""
    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = (torch.randn(3, 5, 48) * 3).requires_grad_()
    upstream, residual_upstream = torch.randn(3, 5, 48), torch.randn(3, 5, 48)
    expected = norm(x)
    expected_grads = torch.autograd.grad(((expected * upstream) + x * residual_upstream).sum(), [x, norm.weight])
    residual, out = ResidualRMSNorm.apply(x, norm.weight, torch.tensor(1e-5), torch.float32)
    assert torch.equal(residual, x)
    grads = torch.autograd.grad(((out * upstream) + residual * residual_upstream).sum(), [x, norm.weight])
    assert relative_error(out, expected) < 1e-6
    for grad, ref in zip(grads, expected_grads):
        assert relative_error(grad, ref) < 1e-5
    _, out = ResidualRMSNorm.apply(x, norm.weight, torch.tensor(1e-5), torch.float32)
    (grad_x,) = torch.autograd.grad((out * upstream).sum(), [x])  # the residual unused
    (expected_grad_x,) = torch.autograd.grad((norm(x) * upstream).sum(), [x])
    assert relative_error(grad_x, expected_grad_x) < 1e-5
    _, half = ResidualRMSNorm.apply(x, norm.weight, torch.tensor(1e-5), torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, expected.to(torch.bfloat16))


def test_rotary_function_equals_rotate_half_with_gradients():
    torch.manual_seed(0)
    model = make_model("llama")
    positions = torch.arange(7).unsqueeze(0)
    cos, sin = model.model.rotary_emb(torch.zeros(1, 7, 32), positions)
    q = torch.randn(2, 4, 7, 8, requires_grad=True)
    k = torch.randn(2, 2, 7, 8, requires_grad=True)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    tables = rotary_tables(cos, sin, torch.float32)
    got = (RotaryFunction.apply(q, *tables), RotaryFunction.apply(k, *tables))
    upstream = [torch.randn_like(t) for t in expected]
    expected_grads = torch.autograd.grad(sum((t * u).sum() for t, u in zip(expected, upstream)), [q, k])
    grads = torch.autograd.grad(sum((t * u).sum() for t, u in zip(got, upstream)), [q, k])
    for a, b in zip([*got, *grads], [*expected, *expected_grads]):
        assert relative_error(a, b) < 1e-6


def decoder_run(model, ids, upstream, fused: bool, bf16: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's output and the gradient reaching its input embeddings (a causal batch, no mask)."""
    layers = model.model.layers
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    with (
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
        fused_decoder_layers(layers) if fused else contextlib.nullcontext(),
    ):
        hidden = model.model(inputs_embeds=embeds, use_cache=False).last_hidden_state
    assert all("forward" not in vars(layer) for layer in layers)
    (grad,) = torch.autograd.grad((hidden.float() * upstream).sum(), [embeds])
    return hidden.float().detach(), grad


def test_fused_layers_equal_transformers_layers_in_float32():
    model = make_model("llama")
    assert fusable_layers(model.model.layers)
    ids, upstream = torch.randint(3, 60, (3, 9)), torch.randn(3, 9, 32)
    (expected, expected_grad), (hidden, grad) = (decoder_run(model, ids, upstream, f, False) for f in (False, True))
    assert relative_error(hidden, expected) < 1e-5 and relative_error(grad, expected_grad) < 1e-5


def test_fused_layers_under_bf16_autocast_are_as_accurate_as_transformers():
    """Against the float32 result, the fused bf16 layers err as much as transformers' bf16 layers: the
    rotary product, rounded to bf16 once more here, is rounded to bf16 for SDPA there anyway."""
    model = make_model("llama")
    ids, upstream = torch.randint(3, 60, (3, 9)), torch.randn(3, 9, 32)
    reference, reference_grad = decoder_run(model, ids, upstream, False, False)
    errors = []
    for fused in (False, True):
        hidden, grad = decoder_run(model, ids, upstream, fused, True)
        errors.append((relative_error(hidden, reference), relative_error(grad, reference_grad)))
    (transformers_out, transformers_grad), (fused_out, fused_grad) = errors
    assert 0 < transformers_out < 0.05 and 0 < transformers_grad < 0.05
    assert fused_out < 1.5 * transformers_out and fused_grad < 1.5 * transformers_grad, errors


def test_only_plain_llama_layers_are_fused():
    assert not fusable_layers(make_model("qwen2").model.layers)
    with pytest.raises(ValueError, match="without a mask"):
        model = make_model("llama")
        with fused_decoder_layers(model.model.layers):
            model(torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]))
