"""Speedups of the training and scoring paths that must not change what is computed: bf16 copies of
the frozen weights (bit-identical to autocast's own casts) and LoRA dropout masks from 16 bits."""

from __future__ import annotations

import peft
import pytest
import torch
from accelerate import Accelerator
from torch import nn

from conftest import make_heft
from heft.config import RunConfig, StageConfig
from heft.data import collate
from heft.io import stage_config_from_dict
from heft.methods.lora import LoraConfig, MaskBitsDropout
from heft.methods.reft import ReftConfig
from heft.models import decoder_layers
from heft.pipeline import HeftModel
from heft.train import Progress, train_stage
from test_pipeline import loss_on, toy_data, train

JOINT = StageConfig(
    method="joint", lora=LoraConfig(r=4, alpha=8, dropout=0.0), reft=ReftConfig(rank=2, positions="f1+l1")
)


def frozen_linear_weights(model) -> list[torch.Tensor]:
    return [
        p
        for layer in decoder_layers(model.model)
        for n, m in layer.named_modules()
        if isinstance(m, nn.Linear) and "lora_" not in n
        for p in (m.weight, m.bias)
        if p is not None
    ]


def loss_and_grads(model, batch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch).loss
    loss.backward()
    grads = [p.grad.clone() for p in model.trainable_parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases
@pytest.mark.parametrize("stage", [JOINT, StageConfig(method="loreft", reft=ReftConfig(rank=2, positions="f1+l1"))])
def test_bf16_copies_of_frozen_weights_compute_exactly_what_autocast_computes(stage, arch):
    model = make_heft(arch)
    train(
        model, StageConfig(method="lora", epochs=1, lr=2e-2, lora=LoraConfig(r=4, dropout=0.0)), toy_data()
    )  # a merged stage
    model.add_stage(stage, seed=0)
    model.train()
    batch = collate(toy_data(8, seed=1), pad_id=0)
    before = [w.detach().clone() for w in frozen_linear_weights(model)]
    loss, grads = loss_and_grads(model, batch)
    with model.frozen_weights_bf16():
        assert {w.dtype for w in frozen_linear_weights(model)} == {torch.bfloat16}
        assert model.trainable_parameters() and {p.dtype for p in model.trainable_parameters()} == {torch.float32}
        with model.frozen_weights_bf16():  # re-entering is a no-op
            pass
        assert {w.dtype for w in frozen_linear_weights(model)} == {torch.bfloat16}
        loss_bf16, grads_bf16 = loss_and_grads(model, batch)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            scores_bf16 = model.next_token_logprobs(batch["input_ids"], batch["attention_mask"])
    assert torch.equal(loss, loss_bf16)
    assert len(grads) == len(grads_bf16) and all(torch.equal(a, b) for a, b in zip(grads, grads_bf16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model.next_token_logprobs(batch["input_ids"], batch["attention_mask"]), scores_bf16)
    after = frozen_linear_weights(model)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(after, before)), (
        "float32 weights back, bit for bit"
    )


@pytest.mark.parametrize(
    "lora",
    [
        LoraConfig(r=4, dropout=0.0, target_modules=["q_proj", "lm_head"]),
        LoraConfig(r=4, dropout=0.0, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    ],
    ids=["adapter-on-head", "head-trained"],
)
def test_bf16_copies_leave_an_adapted_or_trained_head_alone(lora):
    """A LoRA adapter on the LM head, or a trained copy of it, takes part in the forward: no frozen bf16
    copy replaces it."""
    model = make_heft()
    model.add_stage(StageConfig(method="lora", lora=lora), seed=0)
    model.train()
    batch = collate(toy_data(8, seed=1), pad_id=0)
    loss, grads = loss_and_grads(model, batch)
    with model.frozen_weights_bf16():
        loss_bf16, grads_bf16 = loss_and_grads(model, batch)
    head_params = [p for n, p in model.model.named_parameters() if "lm_head" in n and p.requires_grad]
    assert head_params and torch.equal(loss, loss_bf16)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_bf16))


def test_bf16_copies_leave_dora_base_weights_in_float32():
    model = make_heft()
    model.add_stage(StageConfig(method="dora", lora=LoraConfig(r=4)), seed=0)
    dora_bases = {
        id(m.get_base_layer().weight) for m in model.model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    with model.frozen_weights_bf16():
        kept = [w for w in frozen_linear_weights(model) if id(w) in dora_bases]
        assert kept and {w.dtype for w in kept} == {torch.float32}


def test_training_with_bf16_copies_equals_training_without(monkeypatch):
    """`train_stage` holds the copies for each epoch; the trained stage must be the same as without them."""
    stage = StageConfig(
        method="joint",
        epochs=2,
        lr=2e-2,
        lora=LoraConfig(r=4, alpha=8, dropout=0.1),
        reft=ReftConfig(rank=2, positions="f1+l1", dropout=0.1),
    )
    trained = []
    for use_copies in (True, False):
        if not use_copies:
            original = HeftModel.frozen_weights_bf16
            monkeypatch.setattr(HeftModel, "frozen_weights_bf16", lambda self, enabled=True: original(self, False))
        model = make_heft()
        model.add_stage(stage, seed=0)
        cfg = RunConfig(batch_size=8, seed=0, bf16=True, stages=[stage])
        train_stage(model, stage, toy_data(), cfg, Accelerator(), Progress(), lambda *a: None, show_progress=False)
        trained.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    assert trained[0].keys() == trained[1].keys() and trained[0]
    assert all(torch.equal(trained[0][n], trained[1][n]) for n in trained[0])


def test_mask_bits_dropout_drops_p_and_keeps_the_expectation():
    torch.manual_seed(0)
    drop = MaskBitsDropout(0.05)
    x = torch.randn(1000, 1000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.95, abs=1e-3)
    scale = 65536 / (65536 - round(0.05 * 65536))
    assert torch.allclose(y[kept], x[kept] * scale)
    y.sum().backward()
    assert torch.allclose(x.grad, kept.float() * scale)
    assert drop(torch.ones(2000, 2000)).mean().item() == pytest.approx(1.0, abs=2e-3)
    torch.manual_seed(1)
    first = drop(torch.ones(64, 64))
    torch.manual_seed(1)
    assert torch.equal(drop(torch.ones(64, 64)), first), "masks follow torch.manual_seed (resume equals uninterrupted)"
    assert not torch.equal(drop(torch.ones(64, 64)), first)
    drop.eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(MaskBitsDropout(0.0).train()(x), x)


@pytest.mark.parametrize("fast", [True, False])
def test_lora_stage_uses_mask_bits_dropout_only_when_asked(fast):
    model = make_heft()
    model.add_stage(StageConfig(method="lora", lora=LoraConfig(r=4, dropout=0.1, fast_dropout=fast)), seed=0)
    dropouts = [m.lora_dropout["stage0"] for m in model.model.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert dropouts and {type(d) for d in dropouts} == {MaskBitsDropout if fast else nn.Dropout}
    assert all(d.p == 0.1 for d in dropouts)


def test_fast_dropout_is_opt_in_and_old_run_folders_keep_peft_dropout():
    old = {"method": "lora", "lora": {"r": 4, "dropout": 0.1}, "reft": {}}
    assert stage_config_from_dict(old).lora.fast_dropout is False
    assert LoraConfig().fast_dropout is False


def test_training_with_mask_bits_dropout_matches_peft_dropout_within_noise():
    """Other masks, same distribution: the toy task is learnt equally well with either dropout."""
    data = toy_data()
    losses = {}
    for fast in (True, False):
        model = make_heft()
        start = loss_on(model, data)
        stage = StageConfig(
            method="lora", epochs=5, lr=2e-2, lora=LoraConfig(r=4, alpha=8, dropout=0.1, fast_dropout=fast)
        )
        train(model, stage, data)
        losses[fast] = loss_on(model, data)
    assert losses[True] < start / 2 and losses[False] < start / 2
    assert losses[True] == pytest.approx(losses[False], rel=0.25, abs=0.05)
