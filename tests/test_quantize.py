"""Quantized bases (bitsandbytes 4-bit and 8-bit on the CPU): LoRA over them, the merge at a stage's
end (requantized or kept), reload with identical logits, export of dequantized weights, bad input."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import heft.cli
import heft.config
import heft.quantize
import heft.train as train_module
from conftest import make_tokenizer
from heft.cli import main
from heft.config import ConfigError, RunConfig, StageConfig, config_from_dict, load_config, save_config
from heft.io import RunFolderError, export_run, load_run, save_run
from heft.methods.lora import LoraConfig
from heft.models import load_model
from heft.pipeline import HeftModel
from heft.quantize import Backend, QuantizeConfig
from heft.train import Progress, run_training, train_stage
from test_pipeline import LOREFT, batch_of, loss_on, toy_data, train
from test_train import toy_config, write_toy_boolq

pytest.importorskip("bitsandbytes")

FOUR, EIGHT = QuantizeConfig(bits=4), QuantizeConfig(bits=8)
LORA = StageConfig(method="lora", epochs=3, lr=2e-2, lora=LoraConfig(r=4, alpha=8, dropout=0.0))


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny model's bitsandbytes calls last microseconds, and on a CPU shared with
    other jobs two threads spent most of each call waiting for each other (a tiny forward: 0.4 s vs 0.02 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose linear layers are 64 wide: bitsandbytes' CPU 4-bit kernel needs whole blocks of 64."""
    folder = tmp_path_factory.mktemp("quantizable") / "tiny-llama-64"
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    return folder


def logits(model: HeftModel, data) -> torch.Tensor:
    batch = batch_of(data)
    model.eval()
    with torch.no_grad():
        return model.lm_head(model(batch["input_ids"], batch["attention_mask"]).hidden_states)


def quantized_layers(model: HeftModel) -> list[str]:
    """bitsandbytes' Linear4bit / Linear8bitLt layers (not peft's LoRA wrappers around them)."""
    return [
        type(m).__name__
        for m in model.model.modules()
        if type(getattr(m, "weight", None)).__name__ in ("Params4bit", "Int8Params")
    ]


def with_merge(stage: StageConfig, merge: bool) -> StageConfig:
    return dataclasses.replace(stage, lora=dataclasses.replace(stage.lora, merge=merge))


# ------------------------------------------------------------------------------------------ config
def test_quantize_override_fills_the_defaults_and_round_trips(tmp_path):
    cfg = load_config("configs/boolq_heft.yaml", ["quantize.bits=8"])
    assert cfg.quantize == QuantizeConfig(bits=8, backend="bitsandbytes", quant_type="nf4", compute_dtype="bfloat16")
    assert load_config("configs/boolq_heft.yaml").quantize is None
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_an_unset_merge_keeps_the_adapter_on_a_quantized_base_only(model_dir):
    keep = not heft.config.MERGE_ON_QUANTIZED_BASE
    assert load_config("configs/boolq_heft.yaml", ["stages.0.lora.merge=null"]).stages[0].lora.merge is True
    quantized = load_config("configs/boolq_heft.yaml", ["stages.0.lora.merge=null", "quantize.bits=4"])
    assert quantized.stages[0].lora.merge is not keep
    assert load_config("configs/boolq_heft.yaml", ["quantize.bits=4"]).stages[0].lora.merge is True  # as written
    model = HeftModel(load_model(str(model_dir), quantize=EIGHT))
    assert model.add_stage(StageConfig(method="lora")).merges is not keep
    assert HeftModel(load_model(str(model_dir))).add_stage(StageConfig(method="lora")).merges


def fails(capsys, *args: str) -> str:
    """Run `heft train` expecting a one-line user error (exit 2); returns that line."""
    capsys.readouterr()
    assert main(["train", "configs/boolq_heft.yaml", *args, "--output-dir", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error:") and len(err) <= 2 and "Traceback" not in "".join(err), err
    return err[0]


@pytest.fixture
def no_weights(monkeypatch):
    """Every bad input below must fail before a model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the error")

    monkeypatch.setattr(heft.pipeline, "load_model", refuse)


def test_bad_quantize_settings_fail_in_one_line_naming_the_key(capsys, monkeypatch, no_weights):
    line = fails(capsys, "quantize.bits=4", "quantize.compute_dtype=float32")
    assert "'quantize.compute_dtype'" in line and "float32" in line and "override 'quantize.compute_dtype" in line
    line = fails(capsys, "quantize.backend=torchao")
    assert "'quantize.backend'" in line and "torchao" in line
    line = fails(capsys, "quantize.bits=3")
    assert "'quantize.bits'" in line and "4 or 8" in line
    line = fails(capsys, "quantize.quant_type=int4")
    assert "'quantize.quant_type'" in line

    line = fails(capsys, "quantize.bits=8", "stages.0.method=dora")
    assert "'stages.0.method'" in line and "DoRA" in line

    monkeypatch.setattr(heft.config, "quantize_device_type", lambda: "mps")
    line = fails(capsys, "quantize.bits=4")
    assert "'quantize.backend'" in line and "does not run on mps" in line


def test_a_backend_that_is_not_installed_is_named_before_any_weights_load(capsys, monkeypatch, no_weights):
    real = heft.quantize.importlib.util.find_spec
    monkeypatch.setattr(
        heft.quantize.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name)
    )
    line = fails(capsys, "quantize.bits=8")
    assert "'quantize.backend'" in line and "bitsandbytes is not installed" in line
    with pytest.raises(ValueError, match="not installed"):
        load_model("smollm2-135m", quantize=EIGHT)


def test_merge_on_a_base_that_cannot_be_requantized_names_the_stage(capsys, monkeypatch, no_weights):
    monkeypatch.setitem(
        heft.quantize.BACKENDS, "bitsandbytes", Backend("bitsandbytes", "pip", ("cpu", "cuda"), requantizes=False)
    )
    line = fails(capsys, "quantize.bits=4")
    assert "'stages.0.lora.merge'" in line and "requantized" in line
    fails_not = load_config("configs/boolq_heft.yaml", ["quantize.bits=4", "stages.0.lora.merge=false"])
    assert fails_not.stages[0].lora.merge is False


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("quantize", [FOUR, EIGHT], ids=["4bit", "8bit"])
def test_lora_trains_over_a_quantized_base_and_merge_requantizes(model_dir, quantize):
    model = HeftModel(load_model(str(model_dir), quantize=quantize))
    layers = quantized_layers(model)
    assert len(layers) == 2 * 7 and len(set(layers)) == 1  # every decoder linear layer, not the LM head
    data = toy_data(32)
    before = loss_on(model, data)
    stage = with_merge(LORA, True)
    model.add_stage(stage, seed=0)
    cfg = RunConfig(batch_size=8, stages=[stage])
    train_stage(model, stage, data, cfg, Accelerator(), Progress(), lambda *a: None, show_progress=False)
    trained = loss_on(model, data)
    assert trained < before / 2, "LoRA learns over the frozen quantized base"
    model.finish_stage()
    merged = loss_on(model, data)
    assert quantized_layers(model) == layers, "requantized in place: still a quantized base"
    assert merged != trained and abs(merged - trained) < 0.5 * before, "the merge rounds, but keeps the adaptation"


def test_an_evaluation_does_not_break_the_gradients_of_a_4bit_base(model_dir):
    """bitsandbytes repacks 4-bit weights for CPU inference at the first forward without gradients, and
    its packed kernel has no backward; heft switches that off (see `prepare_loaded`)."""

    def lora_grads(evaluate_first: bool) -> dict[str, torch.Tensor]:
        model = HeftModel(load_model(str(model_dir), quantize=FOUR))
        if evaluate_first:
            loss_on(model, toy_data(8))
        model.add_stage(LORA, seed=0)
        model.train()
        model(**batch_of(toy_data(8))).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    fresh, after_eval = lora_grads(False), lora_grads(True)
    assert fresh.keys() == after_eval.keys()
    for name, grad in fresh.items():
        assert torch.allclose(grad, after_eval[name], atol=1e-5), name


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_reft_on_top_then_reload_gives_identical_logits_and_export_dequantizes(model_dir, tmp_path, merge):
    data = toy_data(32)
    model = HeftModel(load_model(str(model_dir), quantize=FOUR))
    train(model, with_merge(LORA, merge), data)
    assert model.stages[0].merged is merge
    lora_only = loss_on(model, data)
    train(model, LOREFT, data)
    assert loss_on(model, data) < lora_only, "ReFT refines on top of the quantized base"
    save_run(model, tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["base_model"]["quantize"] == dataclasses.asdict(FOUR)
    reloaded = load_run(tmp_path / "run")
    assert reloaded.quantize == FOUR
    assert torch.equal(logits(reloaded, data), logits(model, data))

    export_run(tmp_path / "run", tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert getattr(plain.config, "quantization_config", None) is None
    assert all(type(m).__name__ != "Linear4bit" for m in plain.modules())
    exported = load_run(tmp_path / "export")
    assert exported.quantize is None
    difference = (logits(exported, data) - logits(model, data)).abs().max().item()
    assert 0 < difference < 0.1 * logits(model, data).abs().max().item()  # float compute of the same weights
    assert "Dequantized" in (tmp_path / "export" / "HEFT_EXPORT.md").read_text()


def test_export_refuses_an_unmerged_dora_adapter_on_a_quantized_base(model_dir, tmp_path):
    model = HeftModel(load_model(str(model_dir), quantize=FOUR))
    dora = StageConfig(method="dora", epochs=1, lr=1e-2, lora=LoraConfig(r=4, dropout=0.0, merge=False))
    train(model, dora, toy_data(16))
    save_run(model, tmp_path / "run")
    with pytest.raises(ValueError, match="DoRA"):
        export_run(tmp_path / "run", tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_dora_over_an_8bit_base_is_refused_when_the_stage_is_added(model_dir):
    model = HeftModel(load_model(str(model_dir), quantize=EIGHT))
    dora = StageConfig(method="dora", lora=LoraConfig(r=4, merge=False))
    with pytest.raises(ValueError, match="DoRA over an 8-bit base"):
        model.check_stages([dora])
    with pytest.raises(ValueError, match="DoRA over an 8-bit base"):
        model.add_stage(dora)
    assert model.stages == []


def test_a_run_folder_refuses_a_base_quantized_otherwise(model_dir, tmp_path):
    model = HeftModel(load_model(str(model_dir), quantize=EIGHT))
    train(model, with_merge(LORA, False), toy_data(16))
    save_run(model, tmp_path / "run")
    with pytest.raises(RunFolderError, match="quantized as"):
        load_run(tmp_path / "run", model=HeftModel(load_model(str(model_dir))))


# ------------------------------------------------------------------------------------------ recipe
def test_heft_train_on_a_4bit_base_records_the_merge_and_reloads_identically(model_dir, tmp_path, capsys, monkeypatch):
    """The acceptance run, tiny: train, evaluate, save, reload with identical logits, and `heft info`
    shows the probe's loss on both sides of the merge."""
    data_dir = write_toy_boolq(tmp_path / "data", 32, 16)
    config = tmp_path / "quantized.yaml"
    config.write_text(yaml.safe_dump(toy_config(model_dir, data_dir, tmp_path / "unused", bf16=True)))
    run = tmp_path / "run"
    overrides = ["quantize.bits=4", "stages.0.lora.merge=true", "stages.0.epochs=1"]  # as configs/boolq_heft.yaml
    assert main(["train", str(config), *overrides, "--output-dir", str(run), "-q"]) == 0
    ends = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"stage_end"' in line]
    lora_end, reft_end = ends
    assert lora_end["loss_before_merge"] != lora_end["boundary_loss"], "the requantizing merge moved the loss"
    assert "loss_before_merge" not in reft_end
    results = json.loads((run / "results.json").read_text())
    assert results["stages"][0]["loss_before_merge"] == lora_end["loss_before_merge"]

    capsys.readouterr()
    monkeypatch.setattr(heft.cli.console, "width", 250)  # one table row per line
    assert main(["info", str(run)]) == 0
    out = capsys.readouterr().out
    assert "4-bit nf4 by bitsandbytes" in out
    row = next(line for line in out.splitlines() if "0-lora" in line)
    before, after = lora_end["loss_before_merge"], lora_end["boundary_loss"]
    assert f"→ {before:.4f}, merged {after:.4f} ({after - before:+.4f})" in row

    model = load_run(run)
    cfg = load_config(run / "config.yaml")
    assert model.quantize == cfg.quantize == FOUR
    again = load_run(run)
    sample = toy_data(8)
    assert torch.equal(logits(model, sample), logits(again, sample))


def test_an_unmerged_stage_records_the_same_loss_before_and_after(model_dir, tmp_path):
    data_dir = write_toy_boolq(tmp_path / "data", 16, 8)
    raw = toy_config(model_dir, data_dir, tmp_path / "run", quantize={"bits": 8}, eval_every="never")
    raw["stages"] = [{**raw["stages"][0], "epochs": 1, "lora": {"r": 4, "dropout": 0.0, "merge": False}}]
    results = run_training(config_from_dict(raw), tmp_path / "run", show_progress=False)
    stage = results["stages"][0]
    assert stage["loss_before_merge"] == stage["loss_at_end"] is not None


def test_resuming_with_other_quantize_settings_is_refused(model_dir, tmp_path, monkeypatch):
    data_dir = write_toy_boolq(tmp_path / "data", 16, 8)
    raw = toy_config(model_dir, data_dir, tmp_path / "run", quantize={"bits": 8}, eval_every="never")
    real = train_module.train_stage

    def crash_in_second_stage(model, stage, *args, **kwargs):
        if len(model.stages) == 2:
            raise KeyboardInterrupt
        return real(model, stage, *args, **kwargs)

    monkeypatch.setattr(train_module, "train_stage", crash_in_second_stage)
    with pytest.raises(KeyboardInterrupt):
        run_training(config_from_dict(raw), tmp_path / "run", show_progress=False)
    with pytest.raises(ConfigError, match="'quantize'"):
        run_training(config_from_dict({**raw, "quantize": {"bits": 4}}), tmp_path / "run", show_progress=False)


@pytest.mark.parametrize("quantize", [FOUR, EIGHT], ids=["4bit", "8bit"])
def test_the_fused_lora_linear_leaves_bitsandbytes_layers_to_peft(model_dir, quantize):
    """peft's bitsandbytes LoRA layers dequantize inside their own forward; the fused linear multiplies by
    `base.weight` as a float matrix, so it must not take them over (nor a plain peft layer whose base is a
    bitsandbytes subclass of nn.Linear). The training forward with gradients (heft's training kernels)
    then computes what peft's and transformers' own layers do in training mode: without gradients, where
    heft's kernels stay off (not in eval mode: bitsandbytes' int8 layers compute otherwise there)."""
    import bitsandbytes as bnb
    import peft

    from heft.methods.lora.fused import fusable, fused_lora_training

    model = HeftModel(load_model(str(model_dir), quantize=quantize))
    model.add_stage(LORA, seed=0)
    name = model.stages[-1].adapter_name
    layers = model._lora.layers[name]
    assert len(layers) == 2 * 7 and all(type(m).__module__ == "peft.tuners.lora.bnb" for m in layers)
    assert not any(fusable(m, name) for m in layers)
    with fused_lora_training(layers, name) as fused:
        assert fused == 0
    base = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
    over_bnb = peft.tuners.lora.Linear(base, "a", peft.LoraConfig(r=4), r=4)
    assert isinstance(over_bnb, peft.tuners.lora.Linear) and not fusable(over_bnb.train(), "a")

    with torch.no_grad():  # B starts at 0 in peft: a non-zero B makes the adapters count in the loss
        for param in model.trainable_parameters():
            param.normal_(std=0.1)
    batch = batch_of(toy_data(8))
    model.train()
    trained = model(**batch).loss
    trained.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trainable_parameters())
    with torch.no_grad():
        assert torch.allclose(trained.detach(), model(**batch).loss, atol=1e-5)
