"""ReFT intervention modules: each maps hidden states h (..., d) to an additive edit (..., d).

Returning the *edit* rather than the edited state lets the caller scatter-add it into the
residual stream at the chosen positions only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize


class Householder(nn.Module):
    """R (r × d) with orthonormal rows as r Householder reflections of R^d: O(r·d) state and compute.

    Raw tensor X (r × d): row j holds half the tail of reflector j, v_j = e_j + 2·X[j, j+1:] (the
    rest of X is unused); R = first r columns of −H_1⋯H_r, transposed. Every X gives an orthonormal
    R, and no d × d matrix is ever formed (torch's trivialized `orthogonal` keeps a d × d base per
    module). Halving the tails (of norm ≈ 1 at a random R) makes R move twice as fast as X there,
    as torch's map does at its start, so learning rates tuned for pyreft's LoReFT carry over.
    """

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        # The product H_1⋯H_r in compact WY form, I − V T Vᵀ, of which only the first r columns are
        # needed: E − V T V[:r]ᵀ. Vᵀ V holds everything T needs (T⁻¹ = strict upper part of Vᵀ V plus
        # half its diagonal, since τ_j = 2 / v_jᵀv_j). The same R as `torch.linalg.householder_product`
        # to float32 rounding, in a dozen ops whose backward is a few dozen more, where
        # householder_product's backward loops over the reflectors (95 ops in all at r = 4 against 42):
        # a step with an intervention on every layer launches ~3,000 fewer kernels.
        # One product for the rotations of many interventions (X: n × r × d). A single X goes through the
        # same batched kernels, so an intervention's R is bit for bit the R its stage computes for it.
        if X.dim() == 2:
            return self.forward(X.unsqueeze(0)).squeeze(0)
        r, d = X.shape[-2:]
        E = torch.eye(d, r, dtype=X.dtype, device=X.device)
        V = 2 * X.triu(1).mT + E  # (d, r): reflectors v_j = e_j + 2·X[j, j+1:]
        G = V.mT @ V
        T_inv = G.triu(1) + torch.diag_embed(G.diagonal(dim1=-2, dim2=-1) / 2)
        VT = torch.linalg.solve_triangular(T_inv, V[..., :r, :].mT, upper=True)  # T V[:r]ᵀ
        return (V @ VT - E).mT

    @torch.no_grad()
    def right_inverse(self, R: torch.Tensor) -> torch.Tensor:
        """Reflectors of a Householder QR of Rᵀ whose R factor has a positive diagonal: the exact
        inverse of `forward` for orthonormal rows (so a saved R loads as the same raw tensor), and
        Gram–Schmidt orthonormalisation for any other full-rank R."""
        Q = R.mT.to(torch.float64).clone()
        r, d = R.shape
        X = Q.new_zeros(r, d)
        for j in range(r):
            v = Q[j:, j].clone()
            v[0] += v.norm()  # reflects column j onto −|x|·e_j, a negative diagonal, as forward assumes
            if not v[0] > 0:
                raise ValueError(
                    f"cannot represent R: row {j} depends linearly on the rows before it, or is exactly −e_{j}"
                )
            v = v / v[0]
            X[j, j + 1 :] = v[1:] / 2
            Q[j:, j:] -= (2 / v.dot(v)) * torch.outer(v, v @ Q[j:, j:])
        return X.to(R.dtype)


RAW_R = "rotate.parametrizations.weight.original"
"""State-dict key of R's raw reflectors (train.py keeps names with `parametrizations` out of weight decay)."""
LEGACY_BASE = "rotate.parametrizations.weight.0.base"
"""The d × d buffer of torch's trivialized orthogonal map, in interventions saved by earlier heft versions."""


def legacy_rotation(raw: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """R from the state of torch's `orthogonal(nn.Linear(d, r))` (Householder map with its
    trivialization, as saved before): R = (base · H(Xᵀ) · diag(sign))ᵀ, torch 2.x's formula."""
    X = raw.mT
    A = X.tril(diagonal=-1)
    tau = 2 / (1 + A.pow(2).sum(dim=-2))
    Q = torch.linalg.householder_product(A, tau) * X.diagonal().int().unsqueeze(-2)
    return (base @ Q).mT


class LoReFT(nn.Module):
    """Low-rank linear subspace ReFT: ``Φ(h) = h + Rᵀ(W h + b − R h)``.

    R (r × d) keeps orthonormal rows through a Householder parametrization, so the edit acts
    inside an r-dimensional subspace and leaves its orthogonal complement untouched. The state
    dict holds R itself (`rotate.weight`), W and b: r·(2d + 1) numbers, portable and small.
    """

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        if rank > hidden_size:
            raise ValueError(f"LoReFT rank {rank} exceeds the hidden size {hidden_size}")
        # R starts as the orthonormalised rows of nn.Linear's random init.
        self.rotate = parametrize.register_parametrization(
            nn.Linear(hidden_size, rank, bias=False), "weight", Householder()
        )
        self.source = nn.Linear(hidden_size, rank)
        self.dropout = nn.Dropout(dropout)
        self.register_state_dict_post_hook(_save_R)
        self.register_load_state_dict_pre_hook(_load_R)

    @property
    def R(self) -> torch.Tensor:
        return self.rotate.weight

    @staticmethod
    def rotations(modules: Sequence[LoReFT]) -> torch.Tensor:
        """R of every module, stacked (n × r × d): trainable ones from one batched Householder product."""
        if all(parametrize.is_parametrized(m.rotate) for m in modules):
            return Householder()(torch.stack([m.rotate.parametrizations.weight.original for m in modules]))
        return torch.stack([m.R for m in modules])

    @staticmethod
    def stacked(modules: Sequence[LoReFT]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(down, bias, up) of every module stacked, each edit being (h downᵀ + bias) up: W − R, b and R."""
        R = LoReFT.rotations(modules)
        return torch.stack([m.source.weight for m in modules]) - R, torch.stack([m.source.bias for m in modules]), R

    def freeze_rotation_(self) -> None:
        self.freeze_rotations_([self])

    @staticmethod
    @torch.no_grad()
    def freeze_rotations_(modules: Sequence[LoReFT]) -> None:
        """Keep each R as a plain frozen tensor, its reflectors dropped: a finished stage computes no
        Householder product per forward, and its saved R loads bit for bit. R is the one `stacked`
        computed for these modules together, so the frozen stage edits exactly as it trained."""
        trainable = [m for m in modules if parametrize.is_parametrized(m.rotate)]
        if not trainable:
            return
        rotations = LoReFT.rotations(trainable)
        for module, R in zip(trainable, rotations):
            parametrize.remove_parametrizations(module.rotate, "weight")
            module.rotate.weight.copy_(R)
            module.rotate.weight.requires_grad_(False)

    def zero_edit_(self) -> None:
        self.zero_edits_([self])

    @staticmethod
    @torch.no_grad()
    def zero_edits_(modules: Sequence[LoReFT]) -> None:
        """W = R, b = 0: Φ(h) = h exactly, while the gradients of W, b and R stay non-zero. R as `stacked`
        computes it for these modules together, so that W − R is exactly 0 there."""
        for module, R in zip(modules, LoReFT.rotations(modules)):
            module.source.weight.copy_(R)
            module.source.bias.zero_()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # R once per call, in float32 even under bf16 autocast: it stays orthonormal, and equal to the
        # W = R it initialised (a bf16-rounded R would make the identity start edit h).
        with torch.autocast(h.device.type, enabled=False):
            R = self.R
        # (W h + b − R h) as (W − R) h + b: one GEMM instead of two, and exactly 0 when W = R, b = 0.
        return self.dropout(F.linear(h, self.source.weight - R, self.source.bias) @ R)


def _save_R(module: LoReFT, state: dict, prefix: str, local_metadata: dict) -> None:
    """Store R (`rotate.weight`) instead of its raw reflectors: what defines the edit, readable without heft."""
    if prefix + RAW_R in state:
        del state[prefix + RAW_R]
        state[prefix + "rotate.weight"] = module.R.detach()


def _load_R(module: LoReFT, state: dict, prefix: str, *args) -> None:
    """Accept R (or the raw and d × d base tensors of the old format) whether R is frozen or trainable."""
    if prefix + LEGACY_BASE in state:
        state[prefix + "rotate.weight"] = legacy_rotation(state.pop(prefix + RAW_R), state.pop(prefix + LEGACY_BASE))
    if parametrize.is_parametrized(module.rotate) and prefix + "rotate.weight" in state:
        raw = module.rotate.parametrizations.weight.original
        state[prefix + RAW_R] = module.rotate.parametrizations.weight[0].right_inverse(
            state.pop(prefix + "rotate.weight").to(raw)
        )


class DiReFT(nn.Module):
    """Direct ReFT (pyreft's ablation without orthogonality or subtraction): ``Φ(h) = h + W2ᵀ(W1 h + b)``."""

    def __init__(self, hidden_size: int, rank: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, rank)
        self.up = nn.Linear(rank, hidden_size, bias=False)
        self.dropout = nn.Dropout(dropout)

    def zero_edit_(self) -> None:
        self.zero_edits_([self])

    @staticmethod
    @torch.no_grad()
    def zero_edits_(modules: Sequence[DiReFT]) -> None:
        """Zero up-projection (as LoRA's B): Φ(h) = h exactly; its gradient W1 h + b is non-zero."""
        for module in modules:
            module.up.weight.zero_()

    @staticmethod
    def stacked(modules: Sequence[DiReFT]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(down, bias, up) of every module stacked, each edit being (h downᵀ + bias) up: W1, b and W2."""
        down = torch.stack([m.down.weight for m in modules])
        return down, torch.stack([m.down.bias for m in modules]), torch.stack([m.up.weight for m in modules]).mT

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.up(self.down(h)))


INTERVENTIONS: dict[str, type[LoReFT | DiReFT]] = {"loreft": LoReFT, "direft": DiReFT}
