"""ReFT intervention modules: each maps hidden states h (..., d) to an additive edit (..., d).

Returning the *edit* rather than the edited state lets the caller scatter-add it into the
residual stream at the chosen positions only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import orthogonal


class LoReFT(nn.Module):
    """Low-rank linear subspace ReFT: ``Φ(h) = h + Rᵀ(W h + b − R h)``.

    R (r × d) keeps orthonormal rows through torch's orthogonal parametrization, so the edit
    acts inside an r-dimensional subspace and leaves its orthogonal complement untouched.
    """

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        if rank > hidden_size:
            raise ValueError(f"LoReFT rank {rank} exceeds the hidden size {hidden_size}")
        self.rotate = orthogonal(nn.Linear(hidden_size, rank, bias=False))
        self.source = nn.Linear(hidden_size, rank)
        self.dropout = nn.Dropout(dropout)

    @property
    def R(self) -> torch.Tensor:
        return self.rotate.weight

    @torch.no_grad()
    def zero_edit_(self) -> None:
        """W = R, b = 0: Φ(h) = h exactly, while the gradients of W, b and R stay non-zero."""
        self.source.weight.copy_(self.R)
        self.source.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # R once per call, in float32 even under bf16 autocast: it stays orthonormal, and equal to the
        # W = R it initialised (a bf16-rounded R would make the identity start edit h).
        with torch.autocast(h.device.type, enabled=False):
            R = self.R
        # (W h + b − R h) as (W − R) h + b: one GEMM instead of two, and exactly 0 when W = R, b = 0.
        return self.dropout(F.linear(h, self.source.weight - R, self.source.bias) @ R)


class DiReFT(nn.Module):
    """Direct ReFT (pyreft's ablation without orthogonality or subtraction): ``Φ(h) = h + W2ᵀ(W1 h + b)``."""

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, rank)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    @torch.no_grad()
    def zero_edit_(self) -> None:
        """Zero up-projection (as LoRA's B): Φ(h) = h exactly; its gradient W1 h + b is non-zero."""
        self.up.weight.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.up(self.down(h)))


INTERVENTIONS: dict[str, type[LoReFT | DiReFT]] = {"loreft": LoReFT, "direft": DiReFT}
