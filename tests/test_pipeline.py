"""The hierarchy: stages freeze what came before, LoRA merges exactly, every arm learns, runs round-trip."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from accelerate import Accelerator
from torch.nn.utils.parametrizations import orthogonal

import heft.pipeline
from conftest import make_heft
from heft.config import RunConfig, StageConfig
from heft.data import collate
from heft.files import sha256_file
from heft.io import RunFolderError, load_run, save_run
from heft.methods.lora import LoraConfig
from heft.methods.reft import ReftConfig
from heft.models import load_model
from heft.pipeline import HeftModel
from heft.tasks import EncodedExample
from heft.train import Progress, mean_loss, train_stage

LORA = StageConfig(method="lora", epochs=5, lr=2e-2, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
LOREFT = StageConfig(method="loreft", epochs=5, lr=2e-2, reft=ReftConfig(rank=2, positions="f1+l1"))
DIREFT = StageConfig(method="direft", epochs=5, lr=2e-2, reft=ReftConfig(rank=2, positions="l1"))
JOINT = StageConfig(
    method="joint",
    epochs=5,
    lr=2e-2,
    lora=LoraConfig(r=4, alpha=8, dropout=0.0),
    reft=ReftConfig(rank=2, positions="l1"),
)


def toy_data(n: int = 32, seed: int = 0) -> list[EncodedExample]:
    """Learnable toy task: the answer token (7 or 8) is decided by the first prompt token."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        length = int(torch.randint(3, 8, (1,), generator=g))
        prompt = torch.randint(10, 40, (length,), generator=g).tolist()
        label = prompt[0] % 2
        data.append(EncodedExample(input_ids=prompt + [7 + label], prompt_len=length, label=label, truncated=False))
    return data


def batch_of(data: list[EncodedExample], side: str = "right") -> dict[str, torch.Tensor]:
    return collate(data, pad_id=0, padding_side=side)


def loss_on(model: HeftModel, data: list[EncodedExample]) -> float:
    model.eval()
    with torch.no_grad():
        return model(**batch_of(data)).loss.item()


def train(model: HeftModel, stage: StageConfig, data: list[EncodedExample], seed: int = 0) -> None:
    cfg = RunConfig(batch_size=8, seed=seed, stages=[stage])
    model.add_stage(stage, seed=seed)
    train_stage(
        model,
        stage,
        data,
        cfg,
        Accelerator(),
        Progress(stage=len(model.stages) - 1),
        lambda *a: None,
        show_progress=False,
    )
    model.finish_stage()


@pytest.mark.parametrize(
    "stages", [[LORA], [LOREFT], [DIREFT], [LORA, LOREFT], [JOINT]], ids=["lora", "loreft", "direft", "heft", "joint"]
)
def test_every_arm_lowers_training_loss(stages):
    model, data = make_heft("llama"), toy_data()
    before = loss_on(model, data)
    for stage in stages:
        train(model, stage, data)
    after = loss_on(model, data)
    assert after < 0.7 * before, (before, after)


def test_collate_marks_prompt_and_target_for_both_sides():
    data = toy_data(4)
    for side in ["left", "right"]:
        batch = batch_of(data, side)
        for row, ex in enumerate(data):
            real = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
            assert real == ex.input_ids
            assert batch["input_ids"][row][batch["prompt_mask"][row]].tolist() == ex.input_ids[: ex.prompt_len]
            assert batch["labels"][row][batch["labels"][row] != -100].tolist() == ex.input_ids[ex.prompt_len :]


def test_padding_side_does_not_change_loss_or_scores():
    model, data = make_heft("qwen2"), toy_data(6)
    model.add_stage(StageConfig(method="loreft", reft=ReftConfig(rank=2, positions="f1+l1", init="random")), seed=0)
    model.eval()
    with torch.no_grad():
        left, right = model(**batch_of(data, "left")).loss, model(**batch_of(data, "right")).loss
    assert torch.allclose(left, right, atol=1e-5)


def logits_of(model: HeftModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model.lm_head(model(batch["input_ids"], batch["attention_mask"], batch["prompt_mask"]).hidden_states)


@pytest.mark.parametrize("stage", [LOREFT, DIREFT], ids=["loreft", "direft"])
def test_identity_stage_starts_where_the_trained_model_is_and_then_learns(heft_model, stage):
    data = toy_data(16)
    train(heft_model, LORA, data)
    batch = batch_of(data)
    trained = logits_of(heft_model, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained_bf16 = logits_of(heft_model, batch)
    heft_model.add_stage(stage, seed=1)
    assert (logits_of(heft_model, batch) - trained).abs().max() <= 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as training runs with `bf16: true`
        assert torch.equal(logits_of(heft_model, batch), trained_bf16)
    heft_model.train()
    optimizer = torch.optim.AdamW(heft_model.trainable_parameters(), lr=1e-2, weight_decay=0.0)  # decay would zero
    # the ±1 diagonal of the Householder parametrization of R (the recipe never decays it)
    heft_model(**batch).loss.backward()
    optimizer.step()
    assert (logits_of(heft_model, batch) - trained).abs().max() > 1e-4


def test_random_init_stage_perturbs_the_trained_model(heft_model):
    data = toy_data(16)
    train(heft_model, LORA, data)
    batch = batch_of(data)
    trained = logits_of(heft_model, batch)
    heft_model.add_stage(
        StageConfig(method="loreft", reft=ReftConfig(rank=2, positions="f1+l1", init="random")), seed=1
    )
    assert (logits_of(heft_model, batch) - trained).abs().max() > 1e-3


def test_lora_merge_keeps_logits_and_later_stages_leave_it_frozen():
    model, data = make_heft("llama"), toy_data()
    batch = batch_of(data)
    model.add_stage(LORA, seed=0)
    train_stage(
        model,
        LORA,
        data,
        RunConfig(batch_size=8, stages=[LORA]),
        Accelerator(),
        Progress(),
        lambda *a: None,
        show_progress=False,
    )
    model.eval()
    with torch.no_grad():
        before_merge = model(**batch).hidden_states
        model.finish_stage()
        after_merge = model(**batch).hidden_states
    assert (before_merge - after_merge).abs().max() <= 1e-5
    assert not any("lora" in name for name, _ in model.named_modules()), "merged adapter layers must be gone"
    frozen = {k: v.clone() for k, v in model.model.state_dict().items()}
    train(model, LOREFT, data)
    assert all(torch.equal(frozen[k], v) for k, v in model.model.state_dict().items())


def test_dora_and_layers_to_transform_through_peft():
    model, data = make_heft("llama"), toy_data()
    dora = StageConfig(method="dora", epochs=2, lr=2e-2, lora=LoraConfig(r=4, dropout=0.0, layers_to_transform=[1]))
    model.add_stage(dora, seed=0)
    adapted = {name.split(".lora_")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert adapted and all(".layers.1." in name for name in adapted), adapted
    assert any("lora_magnitude_vector" in name for name, _ in model.named_parameters())
    train_stage(
        model,
        dora,
        data,
        RunConfig(batch_size=8, stages=[dora]),
        Accelerator(),
        Progress(),
        lambda *a: None,
        show_progress=False,
    )
    batch = batch_of(data)
    model.eval()
    with torch.no_grad():
        before = model(**batch).hidden_states
        model.finish_stage()
        after = model(**batch).hidden_states
    assert (before - after).abs().max() <= 1e-5, "merging a DoRA stage keeps the outputs"


def test_all_linear_with_layers_to_transform_after_an_unmerged_adapter():
    """`all-linear` is expanded to layer names for peft; an earlier unmerged adapter must not hide them."""
    model = make_heft("llama")
    model.add_stage(StageConfig(method="lora", lora=LoraConfig(r=4, merge=False)), seed=0)
    model.finish_stage()
    model.add_stage(StageConfig(method="lora", lora=LoraConfig(r=4, layers_to_transform=[1])), seed=1)
    in_layers = lambda name: name[name.index("layers.") :]  # noqa: E731
    adapted = {in_layers(name.split(".lora_")[0]) for name, p in model.named_parameters() if p.requires_grad}
    linear = {
        in_layers(name)
        for name, m in make_heft("llama").model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers.1." in name
    }
    assert adapted == linear and len(linear) == 7, adapted


@pytest.mark.parametrize("examples, accumulated", [(16, (8, 2)), (24, (8, 4))], ids=["full-group", "partial-group"])
def test_gradient_accumulation_matches_a_larger_batch(examples, accumulated):
    """Also when the epoch ends inside an accumulation group (3 micro-batches, grad_accum 4): the step
    takes the mean over the micro-batches it has, not 3/4 of it."""
    data = toy_data(examples)
    stage = StageConfig(method="loreft", epochs=1, lr=1e-2, reft=ReftConfig(rank=2, positions="l1"))
    weights, grads = [], []
    for batch_size, accum in [(examples, 1), accumulated]:
        model = make_heft("llama")
        model.add_stage(stage, seed=0)
        # a clipping threshold no gradient reaches, so that the clip call sees the gradient that is applied:
        # AdamW's first step is about lr * sign(grad), blind to a wrong scale (a sum instead of a mean)
        cfg = RunConfig(batch_size=batch_size, grad_accum=accum, max_grad_norm=1e9, stages=[stage])
        accelerator = Accelerator(gradient_accumulation_steps=accum)
        clip = accelerator.clip_grad_norm_

        def record_then_clip(parameters, max_norm):
            parameters = list(parameters)
            grads.append(torch.cat([p.grad.flatten() for p in parameters]))
            return clip(parameters, max_norm)

        accelerator.clip_grad_norm_ = record_then_clip
        progress = Progress()
        train_stage(model, stage, data, cfg, accelerator, progress, lambda *a: None, show_progress=False)
        assert progress.optimizer_steps == 1
        weights.append(torch.cat([p.detach().flatten() for p in model.reft.parameters()]))
    # one optimizer step over the same examples; accumulated micro-batch means differ from the
    # full-batch mean only by the per-micro-batch token normalisation (1 target token each here)
    assert len(grads) == 2 and grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_frozen_reft_stage_unchanged_by_later_stage_and_orthonormal():
    model, data = make_heft("llama"), toy_data()
    stage = LOREFT.__class__(**{**LOREFT.__dict__, "weight_decay": 0.1})
    train(model, stage, data)
    frozen = {k: v.clone() for k, v in model.reft[0].state_dict().items()}
    train(model, LORA.__class__(**{**LORA.__dict__, "lora": LoraConfig(r=4, merge=False)}), data)
    assert all(torch.equal(frozen[k], v) for k, v in model.reft[0].state_dict().items())
    for module in model.reft[0].interventions.values():
        R = module.R
        assert torch.linalg.norm(R @ R.T - torch.eye(R.shape[0])) < 1e-5


def test_generate_edits_prompt_only_and_matches_scoring():
    model = make_heft("llama")
    stage = model.add_stage(LOREFT, seed=0)
    for module in stage.reft.interventions.values():
        module.source.bias.data.fill_(3.0)  # a strong edit, so any misplacement shows
    model.eval()
    data = toy_data(3)
    from heft.data import pad_batch

    ids, mask = pad_batch([e.input_ids[: e.prompt_len] for e in data], 0, "left")
    out = model.generate(ids, mask, max_new_tokens=3, do_sample=False)
    logprobs = model.next_token_logprobs(ids, mask)
    assert torch.equal(out[:, ids.shape[1]], logprobs.argmax(-1)), "first generated token = argmax of scored logits"
    # Continuing generation must equal re-scoring the extended prompt with edits on the prompt only.
    ext_ids, ext_mask = out[:, : ids.shape[1] + 1], torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    prompt_mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1).bool()
    hidden = model(ext_ids, ext_mask, prompt_mask=prompt_mask).hidden_states[:, -1]
    assert torch.equal(out[:, ids.shape[1] + 1], model.lm_head(hidden).argmax(-1))


def _trained_run(tmp_path: Path, tiny_model_dir: Path) -> tuple[HeftModel, Path]:
    model, data = HeftModel(load_model(str(tiny_model_dir))), toy_data()
    for stage in [LORA, LOREFT]:
        train(model, stage, data)
    run = tmp_path / "run"
    save_run(model, run, seed=0)
    return model, run


def test_save_load_round_trip_reproduces_logits(tmp_path, tiny_model_dir):
    model, run = _trained_run(tmp_path, tiny_model_dir)
    loaded = load_run(run)
    batch = batch_of(toy_data(8, seed=1))
    with torch.no_grad():
        a, b = model(**batch).hidden_states, loaded(**batch).hidden_states
        assert (model.lm_head(a) - loaded.lm_head(b)).abs().max() <= 1e-5
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["method"] for s in manifest["stages"]] == ["lora", "loreft"]
    assert manifest["stages"][0]["merged"] and manifest["stages"][0]["trainable_params"] > 0
    assert {"heft", "torch", "transformers", "peft"} <= set(manifest["versions"])
    weights = run / manifest["weights"]
    assert (weights / "0-lora" / "adapter_model.safetensors").is_file()
    assert (weights / "0-lora" / "adapter_config.json").is_file()
    assert (weights / "1-loreft" / "interventions.safetensors").is_file()


def test_unmerged_adapter_round_trips_and_export_merges_it(tmp_path, tiny_model_dir):
    from heft.io import export_run

    model, data = HeftModel(load_model(str(tiny_model_dir))), toy_data()
    train(model, LORA.__class__(**{**LORA.__dict__, "lora": LoraConfig(r=4, dropout=0.0, merge=False)}), data)
    train(model, LOREFT, data)
    assert any("lora_A" in name for name, _ in model.named_parameters()), "merge: false keeps the adapter"
    save_run(model, tmp_path / "run")
    exported = load_run(export_run(tmp_path / "run", tmp_path / "export"))
    loaded = load_run(tmp_path / "run")
    assert not any("lora_A" in name for name, _ in exported.named_parameters())
    batch = batch_of(toy_data(8, seed=1))
    with torch.no_grad():
        reference = model.lm_head(model(**batch).hidden_states)
        for other in (loaded, exported):
            assert (reference - other.lm_head(other(**batch).hidden_states)).abs().max() <= 1e-5


def test_tampered_base_hash_and_half_written_files_are_refused(tmp_path, tiny_model_dir):
    _, run = _trained_run(tmp_path, tiny_model_dir)
    manifest_path = run / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    tampered = {**manifest, "base_model": {**manifest["base_model"], "sha256": "f" * 64}}
    manifest_path.write_text(json.dumps(tampered))
    with pytest.raises(RunFolderError, match="sha256"):
        load_run(run)
    manifest_path.write_text(json.dumps(manifest))
    interventions = next(run.rglob("interventions.safetensors"))
    interventions.write_bytes(interventions.read_bytes()[:100])
    with pytest.raises(RunFolderError, match="incomplete"):
        load_run(run)


def _header_bytes(path: Path) -> int:
    """Size of a safetensors header: an 8-byte length, then that much JSON."""
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_reft_file_holds_only_r_w_and_b_and_old_format_still_loads(tmp_path, tiny_model_dir):
    model, run = _trained_run(tmp_path, tiny_model_dir)
    file = next(run.rglob("interventions.safetensors"))
    trainable_bytes = model.stages[1].trainable_params * 4  # float32
    assert file.stat().st_size <= 1.1 * trainable_bytes + _header_bytes(file)
    with safetensors.safe_open(file, "pt") as saved:
        assert {key.split(".", 2)[2] for key in saved.keys()}  # noqa: SIM118 (safe_open is not iterable) == {"rotate.weight", "source.weight", "source.bias"}
    batch = batch_of(toy_data(8, seed=1))
    with torch.no_grad():
        reference = model.lm_head(model(**batch).hidden_states)
        loaded = load_run(run)
        assert torch.equal(reference, loaded.lm_head(loaded(**batch).hidden_states)), "a frozen R loads bit for bit"

    # Folders written before held, per intervention, torch's raw tensor and a d × d base buffer.
    legacy = {}
    for key, value in safetensors.torch.load_file(file).items():
        if not key.endswith("rotate.weight"):
            legacy[key] = value
            continue
        old = orthogonal(torch.nn.Linear(value.shape[1], value.shape[0], bias=False))
        with torch.no_grad():
            old.weight = value
        legacy |= {key.removesuffix("weight") + k: v.contiguous() for k, v in old.state_dict().items()}
    assert any(v.shape == (32, 32) for v in legacy.values())
    safetensors.torch.save_file(legacy, file)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["files"][str(file.relative_to(run))] = sha256_file(file)
    (run / "manifest.json").write_text(json.dumps(manifest))
    with torch.no_grad():
        loaded = load_run(run)
        assert (reference - loaded.lm_head(loaded(**batch).hidden_states)).abs().max() <= 1e-5


def test_activation_checkpointing_keeps_loss_and_gradients():
    """Checkpointed layers (LoRA inside them, ReFT hooks outside) give the same loss and gradients,
    dropout included: the recompute replays the same masks."""
    data = toy_data(16)
    joint = StageConfig(
        method="joint",
        lora=LoraConfig(r=4, alpha=8, dropout=0.1),
        reft=ReftConfig(rank=2, positions="f1+l1", dropout=0.1),
    )
    grads = []
    for checkpointing in (False, True):
        model = make_heft()
        model.add_stage(joint, seed=0)
        if checkpointing:
            model.enable_activation_checkpointing()
        model.train()
        torch.manual_seed(3)
        loss = model(**batch_of(data)).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, a), (loss_b, b) = grads
    assert torch.allclose(loss_a, loss_b, atol=1e-6) and a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=1e-5), name
    layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and all(m.gradient_checkpointing for m in layers)


@pytest.mark.skipif(
    not (shutil.which("c++") or shutil.which("g++")), reason="torch.compile on the CPU needs a C++ compiler"
)
def test_compiled_layers_keep_loss_gradients_and_state_dict():
    """torch.compile of the decoder layers (LoRA inside, ReFT hooks outside, activation checkpointing
    traced inside) computes the eager loss and gradients without dropout, also across sequence
    lengths, without falling back to eager; on exit the layers are eager again and the state-dict
    keys never change."""
    from torch._dynamo.utils import counters

    data = toy_data(16)
    joint = StageConfig(
        method="joint",
        lora=LoraConfig(r=4, alpha=8, dropout=0.0),
        reft=ReftConfig(rank=2, positions="f1+l1", dropout=0.0),
    )
    results = []
    for mode, checkpointing in ((None, False), ("default", False), ("default", True)):
        model = make_heft()
        model.add_stage(joint, seed=0)
        if checkpointing:
            model.enable_activation_checkpointing()
        keys = list(model.state_dict())
        model.train()
        counters.clear()
        with model.compiled_layers(mode):
            assert model._compiled == (mode is not None)  # the attention kernel stays the default one
            if mode is not None:  # room for several stages' and arms' graphs before dynamo gives up on them
                assert torch._dynamo.config.recompile_limit == heft.pipeline.COMPILED_GRAPHS_LIMIT > 8
            compiled = [type(layer.forward).__name__ for layer in model._layers]
            losses = []
            for width in (8, 5):  # a second sequence length: dynamic shapes, same graph
                batch = {k: v[:, :width] if v.ndim == 2 else v for k, v in batch_of(data).items()}
                loss = model(**batch).loss
                loss.backward()
                losses.append(loss.detach())
        results.append(
            (torch.stack(losses), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        )
        assert list(model.state_dict()) == keys
        assert all("forward" not in vars(layer) for layer in model._layers)
        if mode is not None:
            assert all(name != "method" for name in compiled)  # a compiled wrapper was installed per layer
            assert counters["stats"]["unique_graphs"] > 0, dict(counters)
    (loss_a, a), *compiled_runs = results
    for loss_b, b in compiled_runs:
        assert torch.allclose(loss_a, loss_b, atol=1e-5) and a.keys() == b.keys() and len(a) > 0
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name


def test_short_cpu_sequences_use_the_math_attention_kernel(monkeypatch):
    """Up to SHORT_CPU_SEQUENCE positions, training on the CPU runs SDPA's math kernel (faster
    there, as accurate); longer sequences and scoring keep the default choice. The loss is the same."""
    model = make_heft()
    model.add_stage(
        StageConfig(
            method="joint",
            lora=LoraConfig(r=4, alpha=8, dropout=0.0),
            reft=ReftConfig(rank=2, positions="f1+l1", dropout=0.0),
        ),
        seed=0,
    )
    flash_allowed = []
    model._layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: flash_allowed.append(torch.backends.cuda.flash_sdp_enabled())
    )
    generator = torch.Generator().manual_seed(0)
    losses = []
    for width in (20, heft.pipeline.SHORT_CPU_SEQUENCE + 1):
        ids = torch.randint(7, 40, (2, width), generator=generator)
        labels = ids.masked_fill(torch.arange(width) < width - 3, -100)
        losses.append(model(ids, labels=labels).loss)
    with torch.no_grad():  # scoring: flash stays faster without a backward
        model(ids[:, :20])
    assert flash_allowed == [False, True, True]
    assert isinstance(
        heft.pipeline.attention_kernel(torch.device("cpu"), 20, keep_default=True), contextlib.nullcontext
    )
    monkeypatch.setattr(heft.pipeline, "SHORT_CPU_SEQUENCE", 0)
    ids = torch.randint(7, 40, (2, 20), generator=torch.Generator().manual_seed(0))
    assert torch.allclose(model(ids, labels=ids.masked_fill(torch.arange(20) < 17, -100)).loss, losses[0], atol=1e-5)
    assert flash_allowed[-1] is True


def test_merge_adapters_leaves_out_a_rolled_back_lora_stage():
    """Export merges what is left unmerged; a rolled-back LoRA stage left nothing (it used to fail an assert)."""
    model, data = make_heft("llama"), toy_data()
    train(model, LORA, data)
    before = loss_on(model, data)
    rolled = StageConfig(method="lora", epochs=1, lr=2e-2, lora=LoraConfig(r=4, alpha=8, dropout=0.0, merge=False))
    model.add_stage(rolled, seed=0)
    model.roll_back_stage()
    model.merge_adapters()
    assert loss_on(model, data) == pytest.approx(before, abs=1e-6)


def test_a_new_model_is_in_eval_mode_and_evaluation_leaves_it_so():
    """from_pretrained gives an eval-mode model; the wrapper must agree, or the first helper that
    restores `was_training` switches the model's dropout on for every later score and generate."""
    model = make_heft("llama")
    assert not any(m.training for m in model.modules())
    mean_loss(model, [batch_of(toy_data(4))], bf16=False)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_right_padded_training_batches_attend_without_a_mask(arch, monkeypatch):
    """Right-padded training batches run causal SDPA with no 4-D mask (so a GPU may pick flash; Llama
    through heft's fused layers, other models through transformers) with the loss and gradients of
    the masked path: under a causal mask padding never reaches a real position."""
    data = toy_data(12)
    joint = StageConfig(
        method="joint",
        lora=LoraConfig(r=4, alpha=8, dropout=0.1),
        reft=ReftConfig(rank=2, positions="f1+l1", dropout=0.1),
    )
    batch = batch_of(data)
    assert not batch["attention_mask"].all()  # there is padding
    sdpa = torch.nn.functional.scaled_dot_product_attention
    results = []
    for masked in (False, True):
        if masked:
            monkeypatch.setattr(heft.pipeline, "right_padded", lambda attention_mask: False)
        calls = []
        monkeypatch.setattr(
            torch.nn.functional,
            "scaled_dot_product_attention",
            lambda *args, **kwargs: (
                calls.append((kwargs.get("attn_mask"), kwargs.get("is_causal"))) or sdpa(*args, **kwargs)
            ),
        )
        model = make_heft(arch)
        model.add_stage(joint, seed=0)
        model.train()
        torch.manual_seed(3)
        loss = model(**batch).loss
        loss.backward()
        assert calls and all((mask is None and causal) != masked for mask, causal in calls)
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, a), (loss_b, b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-5) and a.keys() == b.keys() and len(a) > 0
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5, rtol=1e-4), name
