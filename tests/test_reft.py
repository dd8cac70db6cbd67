"""ReFT interventions: formulas, orthonormality, positions under both paddings."""

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from heft.methods.reft import (
    DiReFT,
    LoReFT,
    ReftConfig,
    ReftModel,
    intervention_positions,
    parse_layers,
    parse_positions,
)
from heft.methods.reft.layer import LEGACY_BASE, RAW_R


def test_loreft_matches_formula():
    torch.manual_seed(0)
    module = LoReFT(16, 4)
    h = torch.randn(3, 5, 16)
    R, W, b = module.R, module.source.weight, module.source.bias
    expected = h + (h @ W.T + b - h @ R.T) @ R
    assert torch.allclose(h + module(h), expected, atol=1e-6)


def test_direft_matches_formula():
    torch.manual_seed(0)
    module = DiReFT(16, 4)
    h = torch.randn(3, 5, 16)
    W1, b, W2 = module.down.weight, module.down.bias, module.up.weight.T  # W2: (r, d)
    assert torch.allclose(h + module(h), h + (h @ W1.T + b) @ W2, atol=1e-6)


@pytest.mark.parametrize("cls", [LoReFT, DiReFT])
def test_identity_init_edits_nothing_yet_every_parameter_can_learn(cls):
    torch.manual_seed(0)
    module = cls(16, 4)
    h = torch.randn(3, 5, 16)
    assert module(h).abs().max() > 1e-3, "the random (pyreft) init edits h before any training"
    module.zero_edit_()
    assert torch.equal(module(h), torch.zeros_like(h))
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(2):  # DiReFT's down-projection gets a gradient once the up-projection moved
        optimizer.zero_grad()
        (module(h) - 1).pow(2).mean().backward()
        optimizer.step()
    assert module(h).abs().max() > 1e-3


def test_rotation_stays_orthonormal_after_training():
    torch.manual_seed(0)
    module = LoReFT(32, 6)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.05, weight_decay=0.0)
    for _ in range(20):
        loss = (module(torch.randn(8, 32)) - 1).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    R = module.R
    assert torch.linalg.norm(R @ R.T - torch.eye(6)) < 1e-5
    assert loss.item() < 1.0


def test_rotation_state_is_r_by_d_and_round_trips():
    """No d × d tensor in memory or in the state dict, which holds R itself; loading R rebuilds the
    same raw reflectors (so a resumed optimizer's moments still fit them) and, once frozen, R bit for bit."""
    torch.manual_seed(0)
    d, r = 64, 4
    module = LoReFT(d, r)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.05, weight_decay=0.0)
    for _ in range(20):
        optimizer.zero_grad()
        (module(torch.randn(8, d)) - 1).pow(2).mean().backward()
        optimizer.step()
    tensors = [*module.parameters(), *module.buffers(), *module.state_dict().values()]
    assert max(t.numel() for t in tensors) <= r * d
    state = module.state_dict()
    assert set(state) == {"rotate.weight", "source.weight", "source.bias"}
    assert torch.equal(state["rotate.weight"], module.R) and torch.allclose(
        module.R @ module.R.T, torch.eye(r), atol=1e-6
    )

    trainable = LoReFT(d, r)
    trainable.load_state_dict(state)
    a, b = (dict(m.named_parameters())[RAW_R].triu(1) for m in (module, trainable))  # the used part
    assert torch.allclose(a, b, atol=1e-6), "the same reflectors, not just the same R"
    assert torch.allclose(trainable.R, module.R, atol=1e-6)
    frozen = LoReFT(d, r)
    frozen.freeze_rotation_()
    frozen.load_state_dict(state)
    h = torch.randn(3, d)
    assert torch.equal(frozen.R, module.R) and torch.equal(frozen(h), module(h))
    assert [n for n, _ in frozen.named_parameters()] == ["rotate.weight", "source.weight", "source.bias"]


def test_interventions_saved_by_the_old_parametrization_still_load():
    """Before, R was torch's trivialized orthogonal map: a raw r × d tensor and a d × d base buffer."""
    torch.manual_seed(0)
    d, r = 48, 4
    old = orthogonal(nn.Linear(d, r, bias=False))
    with torch.no_grad():
        old.parametrizations.weight.original.add_(
            0.1 * torch.randn(r, d).triu(1)
        )  # the reflectors, as training moves them
    source = nn.Linear(d, r)
    state = {f"rotate.{k}": v for k, v in old.state_dict().items()} | {
        f"source.{k}": v for k, v in source.state_dict().items()
    }
    assert LEGACY_BASE in state and state[LEGACY_BASE].shape == (d, d)
    h = torch.randn(5, d)
    expected = (source(h) - h @ old.weight.T) @ old.weight
    for frozen in (True, False):
        module = LoReFT(d, r)
        if frozen:
            module.freeze_rotation_()
        module.load_state_dict(state)
        assert torch.allclose(module.R, old.weight, atol=1e-6)
        assert torch.allclose(module(h), expected, atol=1e-5)


def test_rotation_equals_householder_product_with_a_cheap_backward():
    """R in compact WY form is the product of the r reflections that torch's householder_product
    computes, with the same gradients, in far fewer ops (each one a kernel launch on a GPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from heft.methods.reft.layer import Householder

    class CountOps(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.count += not func.is_view
            return func(*args, **(kwargs or {}))

    def reference(X: torch.Tensor) -> torch.Tensor:
        A = 2 * X.triu(1).mT
        return -torch.linalg.householder_product(A, 2 / (1 + A.pow(2).sum(dim=0))).mT

    torch.manual_seed(0)
    upstream = torch.randn(4, 96, dtype=torch.float64)
    results = []
    for rotation in (reference, Householder()):
        X = (torch.randn(4, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.5).requires_grad_()
        with CountOps() as ops:
            R = rotation(X)
            (R * upstream).sum().backward()
        results.append((R.detach(), X.grad, ops.count))
    (R_ref, grad_ref, ops_ref), (R, grad, ops_count) = results
    assert torch.allclose(R, R_ref, atol=1e-12) and torch.allclose(grad, grad_ref, atol=1e-12)
    assert torch.allclose(R @ R.mT, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert ops_count < ops_ref / 2, (ops_count, ops_ref)


def test_parse_positions_and_layers():
    assert parse_positions("f7+l7") == (7, 7)
    assert parse_positions("l1") == (0, 1)
    assert parse_positions("f3") == (3, 0)
    for bad in [
        "",
        "x1",
        "f1+",
        "l1+f1",
        "+l1",
        "f7l7",
        "f0",
        "f0+l1",
        "l01",
    ]:  # one syntax for config and interventions
        with pytest.raises(ValueError):
            parse_positions(bad)
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("1:3", 4) == [1, 2]
    assert parse_layers([0, -1], 4) == [0, 3]
    with pytest.raises(ValueError, match="4 layers"):
        parse_layers([7], 4)


def _masks(lengths: list[int], width: int, side: str) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, width - n :] = True
        else:
            mask[row, :n] = True
    return mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_positions_by_hand(side):
    lengths, width = [6, 3, 1], 8
    index, valid = intervention_positions(_masks(lengths, width, side), first=2, last=2)
    for row, n in enumerate(lengths):
        start = width - n if side == "left" else 0
        expected = [start, start + 1, start + n - 2, start + n - 1]
        expected_valid = [n > 0, n > 1, n - 2 >= 0, n - 1 >= 0]
        got = [int(i) for i, v in zip(index[row], valid[row]) if v]
        assert got == [e for e, v in zip(expected, expected_valid) if v]


@pytest.mark.parametrize("share", [False, True])
def test_edit_touches_only_prompt_positions(share):
    torch.manual_seed(0)
    reft = ReftModel(
        ReftConfig(rank=2, layers="all", positions="f1+l2", share_weights=share, init="random"),
        hidden_size=8,
        num_layers=1,
    )
    hidden = torch.randn(2, 7, 8)
    for side in ["left", "right"]:
        mask = _masks([5, 2], 7, side)
        index, valid = intervention_positions(mask, 1, 2)
        edited = reft.edit(0, hidden, index, valid)
        changed = (edited - hidden).abs().sum(-1) > 0
        assert not changed[~mask].any(), "pad positions must stay untouched"
        expected = torch.zeros_like(changed)
        for row in range(2):
            expected[row, index[row][valid[row]]] = True
        assert torch.equal(changed, expected)


def test_left_and_right_padding_give_same_edits():
    torch.manual_seed(0)
    reft = ReftModel(ReftConfig(rank=2, positions="f2+l2", init="random"), hidden_size=8, num_layers=1)
    lengths = [5, 3]
    h_right, h_left = torch.zeros(2, 6, 8), torch.zeros(2, 6, 8)
    tokens = [torch.randn(n, 8) for n in lengths]
    for row, n in enumerate(lengths):
        h_right[row, :n], h_left[row, 6 - n :] = tokens[row], tokens[row]
    out_right = reft.edit(0, h_right, *intervention_positions(_masks(lengths, 6, "right"), 2, 2))
    out_left = reft.edit(0, h_left, *intervention_positions(_masks(lengths, 6, "left"), 2, 2))
    for row, n in enumerate(lengths):
        assert torch.allclose(out_right[row, :n], out_left[row, 6 - n :], atol=1e-6)


@pytest.mark.parametrize(
    ("kind", "positions", "share"), [("loreft", "f2+l3", False), ("loreft", "f2+l2", True), ("direft", "l2", False)]
)
def test_batched_edit_equals_each_intervention_applied_alone(kind, positions, share):
    """One gather, two batched GEMMs and one scatter per layer (and one Householder product for every
    rotation) compute what each intervention's own forward adds at its positions, gradients included."""
    torch.manual_seed(0)
    config = ReftConfig(kind=kind, rank=3, layers="all", positions=positions, share_weights=share, init="random")
    reft = ReftModel(config, hidden_size=10, num_layers=2)
    first, last = parse_positions(positions)
    mask = _masks([6, 4, 2], 8, "right")
    index, valid = intervention_positions(mask, first, last)
    hidden = torch.randn(3, 8, 10, requires_grad=True)
    batched = reft.edit(1, hidden, index, valid)
    expected = hidden.clone()
    for row in range(3):
        for slot, (i, ok) in enumerate(zip(index[row].tolist(), valid[row].tolist())):
            group = "shared" if share else ("first" if slot < first else "last")
            if ok:
                expected[row, i] += reft.interventions[f"1_{group}"](hidden[row, i])
    assert torch.allclose(batched, expected, atol=1e-5)
    upstream = torch.randn_like(batched)
    inputs = [hidden] + [p for name, p in reft.named_parameters() if name.startswith("interventions.1_")]
    grads = torch.autograd.grad((batched * upstream).sum(), inputs)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    for grad, ref in zip(grads, expected_grads):
        assert torch.allclose(grad, ref, atol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[1:])
