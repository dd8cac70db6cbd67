"""The fused LoRA training forward against peft's own module: same outputs, gradients and state dicts."""

from __future__ import annotations

import peft
import pytest
import torch
from torch import nn

from heft.methods.lora import MaskBitsDropout
from heft.methods.lora.fused import fusable, fused_lora_training


class TwoLinears(nn.Module):
    """Two stacked linear layers (one with a bias), enough for peft to wrap."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(24, 40, bias=True)
        self.down = nn.Linear(40, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


def lora_model(dropout: float, seed: int = 0, **config) -> peft.PeftModel:
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        TwoLinears(),
        peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout, target_modules=["up", "down"], **config),
        adapter_name="stage0",
    )
    with torch.no_grad():  # B starts at 0 in peft; a non-zero B makes every gradient path count
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model.train()


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-6) -> bool:
    """Equal to `tol` relative to the larger tensor's largest magnitude (float32 rounding of a different op order)."""
    return bool((a - b).abs().max() <= tol * b.abs().max())


def run(model: nn.Module, x: torch.Tensor, fused: bool, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Output and gradients (input, then adapter parameters) of one forward and backward from `seed`."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    if fused:
        with fused_lora_training(model.modules(), "stage0") as count:
            assert count == 2
            out = model(x)
    else:
        out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fused_lora_equals_peft_in_float32(dropout):
    """Same outputs and gradients to 1e-6: the dropout masks are the same draws (native_dropout takes
    the generator's numbers as nn.Dropout does), and A, B and the scale are peft's parameters."""
    model = lora_model(dropout)
    x = torch.randn(3, 7, 24)
    reference, reference_grads = run(model, x, fused=False)
    out, grads = run(model, x, fused=True)
    assert close(out, reference)
    assert len(grads) == len(reference_grads) == 5
    for grad, ref in zip(grads, reference_grads):
        assert close(grad, ref)
    if dropout:  # the masks matter: another seed gives other outputs
        other, _ = run(model, x, fused=True, seed=2)
        assert not torch.allclose(other, reference, atol=1e-3)


def test_fused_lora_with_mask_bits_dropout_equals_peft():
    model = lora_model(0.3)
    for module in model.modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            module.lora_dropout["stage0"] = MaskBitsDropout(0.3)
    x = torch.randn(2, 5, 24)
    reference, reference_grads = run(model, x, fused=False)
    out, grads = run(model, x, fused=True)
    assert close(out, reference)
    for grad, ref in zip(grads, reference_grads):
        assert close(grad, ref)


def test_fused_lora_under_bf16_autocast_matches_peft_to_bf16_rounding():
    model = lora_model(0.0)
    x = torch.randn(4, 6, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference, reference_grads = run(model, x, fused=False)
        out, grads = run(model, x, fused=True)
    assert out.dtype == reference.dtype == torch.bfloat16
    assert close(out.float(), reference.float(), 0.02)
    for grad, ref in zip(grads, reference_grads):
        assert grad.dtype == ref.dtype  # the float32 parameters get float32 gradients
        assert close(grad.float(), ref.float(), 0.02)


def test_fused_lora_leaves_peft_forward_state_dict_and_merge_untouched():
    model = lora_model(0.0)
    keys = sorted(peft.get_peft_model_state_dict(model, adapter_name="stage0"))
    with fused_lora_training(model.modules(), "stage0"):
        assert all("forward" in m.__dict__ for m in model.modules() if isinstance(m, peft.tuners.lora.Linear))
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert sorted(peft.get_peft_model_state_dict(model, adapter_name="stage0")) == keys
    assert all(".stage0." not in k for k in keys) and any("lora_A" in k for k in keys)


def test_dora_and_inactive_adapters_are_not_fused():
    dora = lora_model(0.0, use_dora=True)
    assert not any(fusable(m, "stage0") for m in dora.modules())
    plain = lora_model(0.0)
    plain.add_adapter("stage1", peft.LoraConfig(r=2, target_modules=["up", "down"]))
    plain.base_model.set_adapter(["stage0", "stage1"])  # two active adapters: peft's forward sums them
    assert not any(fusable(m, "stage1") for m in plain.modules())
    with fused_lora_training(plain.modules(), "stage1") as count:
        assert count == 0
