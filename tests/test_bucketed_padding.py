"""Bucketed padding (`pad_to_multiple_of`): batch widths rounded up so compiled layers see few shapes,
with the loss, its gradients and ReFT's positions those of the batch padded to its longest example."""

from __future__ import annotations

import shutil

import pytest
import torch
from accelerate import Accelerator

from conftest import make_heft
from heft.config import ConfigError, RunConfig, StageConfig, config_from_dict
from heft.data import CUDA_PAD_MULTIPLE, collate, pad_multiple
from heft.methods.lora import LoraConfig
from heft.methods.reft import ReftConfig, intervention_positions
from heft.tasks import EncodedExample
from heft.train import Progress, train_stage

# dropout off: its masks are drawn per element, so a wider batch draws different ones (equal in distribution)
LORA = StageConfig(method="lora", epochs=1, lr=2e-2, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
# a random start, so that the edits, and thus the positions they sit at, change the loss
LOREFT = StageConfig(method="loreft", epochs=1, lr=2e-2, reft=ReftConfig(rank=2, positions="f2+l2", init="random"))


def examples(n: int = 8, seed: int = 0) -> list[EncodedExample]:
    """Prompts of 3–9 tokens and a one-token answer: batch widths of 4–10, none a multiple of 16."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 10, (1,), generator=g))
        prompt = torch.randint(10, 40, (length,), generator=g).tolist()
        label = prompt[0] % 2
        out.append(EncodedExample(prompt + [7 + label], prompt_len=length, label=label, truncated=False))
    return out


def loss_and_grads(stage: StageConfig, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """One training forward and backward of a fresh model with `stage` (same seed each call)."""
    model = make_heft()
    model.add_stage(stage, seed=0)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage", [LORA, LOREFT], ids=["lora", "loreft"])
def test_bucketed_batches_give_the_same_loss_and_gradients(stage):
    data = examples()
    plain, bucketed = collate(data, 0), collate(data, 0, pad_to_multiple_of=16)
    width = plain["input_ids"].shape[1]
    assert width < 16 and bucketed["input_ids"].shape[1] == 16
    for key in plain:  # the extra columns are padding: no token, no prompt, no label
        assert torch.equal(bucketed[key][:, :width], plain[key]), key
    assert not bucketed["attention_mask"][:, width:].any() and (bucketed["labels"][:, width:] == -100).all()
    loss_a, grads_a = loss_and_grads(stage, plain)
    loss_b, grads_b = loss_and_grads(stage, bucketed)
    assert torch.allclose(loss_a, loss_b, atol=1e-6, rtol=0), (loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5), name


def test_reft_positions_stay_on_the_real_prompt_tokens():
    data = examples()
    plain, bucketed = collate(data, 0), collate(data, 0, pad_to_multiple_of=16)
    index_a, valid_a = intervention_positions(plain["prompt_mask"], 2, 2)
    index_b, valid_b = intervention_positions(bucketed["prompt_mask"], 2, 2)
    assert torch.equal(index_a, index_b) and torch.equal(valid_a, valid_b)
    lengths = torch.tensor([e.prompt_len for e in data])
    assert torch.equal(index_b[:, -1], lengths - 1)  # the last slot is each prompt's last token


def test_pad_multiple_resolves_auto_by_device():
    assert pad_multiple("auto", torch.device("cuda")) == CUDA_PAD_MULTIPLE == 64
    assert pad_multiple("auto", torch.device("cpu")) == 1
    assert pad_multiple(None, torch.device("cuda")) == 1
    assert pad_multiple(8, torch.device("cpu")) == 8


@pytest.mark.parametrize("bad", [0, -64, "64", True, 1.5])
def test_pad_to_multiple_of_rejects_what_is_not_auto_or_a_positive_integer(bad):
    with pytest.raises(ConfigError, match="pad_to_multiple_of"):
        config_from_dict({"pad_to_multiple_of": bad})


def widths_trained(cfg: RunConfig, stage: StageConfig) -> list[int]:
    """Train `stage` for one epoch under `cfg`; the width of every batch the model's forward received."""
    model = make_heft()
    model.add_stage(stage, seed=0)
    widths: list[int] = []
    forward = model.forward

    def spy(**batch):
        widths.append(batch["input_ids"].shape[1])
        return forward(**batch)

    model.forward = spy
    train_stage(model, stage, examples(16), cfg, Accelerator(), Progress(), lambda *a: None, show_progress=False)
    return widths


def test_training_batches_are_bucketed():
    widths = widths_trained(RunConfig(batch_size=4, pad_to_multiple_of=16, stages=[LORA]), LORA)
    assert widths == [16] * 4
    assert set(widths_trained(RunConfig(batch_size=4, stages=[LORA]), LORA)) != {16}  # auto: none on the CPU


@pytest.mark.slow  # 82 s on the 2-core development machine under load, most of it inductor's compilation
@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on the CPU needs a C++ compiler"
)
def test_compiled_training_runs_on_bucketed_batches():
    """`compile` (reduce-overhead on CUDA: one CUDA graph per shape) trains through the same bucketed loader."""
    cfg = RunConfig(batch_size=4, pad_to_multiple_of=16, compile="default", stages=[LOREFT])
    assert widths_trained(cfg, LOREFT) == [16] * 4
