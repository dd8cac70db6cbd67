"""`heft bench` on a tiny model: the record's structure, and that MFU is computed from the measured peak."""

from __future__ import annotations

import json
import sys

import pandas as pd
import pytest
import torch

from conftest import WORDS
from heft.bench import FLOPS_CONVENTION, PATHS, parse_paths
from heft.cli import main
from heft.sysinfo import proc_status_mb, reset_peak_memory


def write_boolq(folder, n: int = 16) -> None:
    """A BoolQ folder of `n` rows per split, with passages of different lengths (so batches differ)."""
    folder.mkdir(parents=True)
    rows = [
        {"question": " ".join(WORDS[4:7]), "passage": " ".join(WORDS[4 : 6 + i % 9]), "answer": bool(i % 2)}
        for i in range(n)
    ]
    for split in ("train", "validation"):
        pd.DataFrame(rows).to_parquet(folder / f"{split}.parquet")


def test_bench_records_every_path_against_the_measured_peak(tmp_path, tiny_model_dir, monkeypatch, capsys):
    write_boolq(tmp_path / "data" / "boolq")
    monkeypatch.setenv("HEFT_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "bench.json"
    assert (
        main(
            [
                "bench",
                "--model",
                str(tiny_model_dir),
                "--batches",
                "3",
                "--batch-size",
                "4",
                "--max-length",
                "24",
                "--device",
                "cpu",
                "--repeats",
                "3",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    record = json.loads(out.read_text())
    assert "vs peft-lora" in capsys.readouterr().out
    assert record["command"].endswith(
        f"heft bench --model {tiny_model_dir} --batches 3 --batch-size 4 --max-length 24 "
        "--device cpu --paths scoring,lora,peft-lora,loreft,joint --repeats 3 --warmup 1"
    )
    assert {"cpu", "cores", "torch_threads", "gpu"} <= record["machine"].keys() and record["machine"]["gpu"] is None
    assert {"torch", "transformers", "peft", "heft"} <= record["versions"].keys()
    assert record["flops_convention"] == FLOPS_CONVENTION
    n_linear = 2 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3)  # 2 layers: q, o; k, v (2 kv heads of 8); gate, up, down
    assert record["model"]["linear_params"] == n_linear
    assert record["data"]["batches"] == 3 and 0 < record["data"]["tokens"] <= record["data"]["padded_tokens"]
    peak = record["gemm"]["bfloat16"]["gflops"]
    assert peak > 0 and record["gemm"]["float32"]["gflops"] > 0
    assert (
        [[s["in"], s["out"], s["count"]] for s in record["gemm"]["bfloat16"]["shapes"]]
        == record["model"]["linear_shapes"]
        == [[32, 16, 4], [32, 32, 4], [32, 64, 4], [64, 32, 2]]
    )
    assert list(record["paths"]) == list(PATHS)
    for name, r in record["paths"].items():
        assert r["tok_s"] > 0 and r["seconds"] > 0 and r["peak_memory_mb"] is not None
        # seconds are stored to 0.1 ms: on a fast machine the tiny model's run lasts a few ms
        assert r["tok_s"] == pytest.approx(r["tokens"] / r["seconds"], rel=1e-3 + 6e-5 / r["seconds"])
        assert r["flops_per_token"] == (2 if name == "scoring" else 4) * n_linear
        assert r["mfu"] == pytest.approx(r["flops_per_token"] * r["tok_s"] / (peak * 1e9), rel=2e-3)
        assert (r["trainable_params"] > 0) == (name != "scoring")
    train_tokens = record["data"]["tokens"]
    assert all(record["paths"][p]["tokens"] == train_tokens for p in ("lora", "peft-lora", "loreft", "joint"))
    assert record["paths"]["scoring"]["tokens"] < train_tokens  # prompts only
    assert record["paths"]["lora"]["trainable_params"] == record["paths"]["peft-lora"]["trainable_params"]
    assert record["heft_lora_vs_peft_lora"] == pytest.approx(
        record["paths"]["lora"]["tok_s"] / record["paths"]["peft-lora"]["tok_s"], rel=1e-2
    )


def test_paths_are_validated_and_run_in_a_fixed_order():
    assert parse_paths("peft-lora, lora") == ["lora", "peft-lora"]
    with pytest.raises(ValueError, match="unknown --paths"):
        parse_paths("lora,dora")


def test_cpu_clock_for_a_shared_machine_is_recorded_and_checked(tmp_path, tiny_model_dir, monkeypatch):
    import torch

    from heft.bench import run_bench

    write_boolq(tmp_path / "data" / "boolq")
    monkeypatch.setenv("HEFT_DATA_DIR", str(tmp_path / "data"))
    threads = torch.get_num_threads()
    try:
        record = run_bench(
            str(tiny_model_dir),
            batches=2,
            batch_size=4,
            max_length=24,
            device="cpu",
            paths=["lora"],
            repeats=2,
            threads=1,
            clock="cpu",
            pad_to_multiple_of=16,
        )
        assert torch.get_num_threads() == 1 and record["machine"]["torch_threads"] == 1
    finally:
        torch.set_num_threads(threads)
    assert record["settings"]["clock"] == "cpu" and record["command"].endswith(
        "--threads 1 --clock cpu --pad-to-multiple-of 16"
    )
    assert record["settings"]["pad_to_multiple_of"] == 16 and record["data"]["padded_tokens"] % (4 * 16) == 0
    assert record["paths"]["lora"]["tok_s"] > 0
    with pytest.raises(ValueError, match="--clock"):
        run_bench(str(tiny_model_dir), device="cpu", clock="gpu")


def test_fast_dropout_reaches_heft_s_lora_stage_only_and_is_rerun_by_check(tmp_path, tiny_model_dir, monkeypatch):
    from heft.bench import run_bench
    from heft.bench_check import baseline_settings
    from heft.pipeline import HeftModel

    write_boolq(tmp_path / "data" / "boolq")
    monkeypatch.setenv("HEFT_DATA_DIR", str(tmp_path / "data"))
    added = []
    add_stage = HeftModel.add_stage

    def spy(self, config, seed=None):
        added.append(config.lora.fast_dropout)
        return add_stage(self, config, seed)

    monkeypatch.setattr(HeftModel, "add_stage", spy)
    record = run_bench(
        str(tiny_model_dir), batches=1, batch_size=4, max_length=24, device="cpu", paths=["lora", "peft-lora"],
        repeats=1, fast_dropout=True,
    )  # fmt: skip
    assert added == [True], "heft's LoRA path trains with lora.fast_dropout"
    stages = record["settings"]["stages"]
    assert stages["lora"]["lora"]["fast_dropout"] and not stages["peft-lora"]["lora"]["fast_dropout"]
    assert record["settings"]["lora_fast_dropout"] and record["command"].endswith("--fast-dropout")
    assert baseline_settings(record)["fast_dropout"] is True


def test_a_random_model_without_tokenizer_benches_on_a_4bit_base_beside_its_plan(tmp_path):
    """The 7B GPU bench's path (tools/device/bench_7b.sh) on a tiny random Llama saved without a tokenizer:
    synthetic token ids, a 4-bit bitsandbytes base for heft's paths and the QLoRA reference alike, and
    `heft plan`'s peak beside each of heft's training paths."""
    import bitsandbytes as bnb

    from conftest import make_model
    from heft.bench import Base
    from heft.bench_check import baseline_settings

    folder = tmp_path / "random-llama"
    make_model("llama").save_pretrained(folder)  # config and weights only
    loaded = Base(str(folder), "bfloat16", 4, tokenizer=False).load()
    assert loaded.tokenizer is None
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules()) == 2 * 7  # q k v o gate up down
    out = tmp_path / "bench.json"
    options = ["--model", str(folder), "--dtype", "bfloat16", "--quantize", "4", "--synthetic", "--plan"]
    sizes = ["--batches", "2", "--batch-size", "2", "--max-length", "16", "--device", "cpu", "--repeats", "1"]
    assert main(["bench", *options, *sizes, "--paths", "lora,peft-lora,loreft,joint", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["command"].endswith("--dtype bfloat16 --quantize 4 --synthetic --plan")
    assert record["settings"]["quantize"] == {"bits": 4, "backend": "bitsandbytes"}
    assert record["settings"]["weights_dtype"] == "bfloat16"
    again = baseline_settings(record)
    assert (again["dtype"], again["quantize"], again["synthetic"]) == ("bfloat16", 4, True), (
        "`heft bench --check` reruns this record on the same kind of base and data"
    )
    assert record["data"]["source"] == "synthetic token ids (vocabulary 64)"
    assert record["data"]["tokens"] == record["data"]["padded_tokens"] == 2 * 2 * 16
    assert record["model"]["linear_shapes"] == [[32, 16, 4], [32, 32, 4], [32, 64, 4], [64, 32, 2]]
    assert list(record["paths"]) == ["lora", "peft-lora", "loreft", "joint"]
    for name, r in record["paths"].items():
        assert r["tok_s"] > 0 and r["tokens"] == 64
        assert ("plan_peak_mb" in r) == (name != "peft-lora")
        assert r.get("plan_peak_mb", 1) > 0
    assert record["paths"]["lora"]["trainable_params"] == record["paths"]["peft-lora"]["trainable_params"]


def test_synthetic_data_is_for_training_paths_and_a_base_has_4_or_8_bits(tiny_model_dir):
    from heft.bench import run_bench

    with pytest.raises(ValueError, match="--synthetic times the training paths"):
        run_bench(str(tiny_model_dir), device="cpu", synthetic=True)  # the default paths include scoring
    with pytest.raises(ValueError, match="--quantize 3"):
        run_bench(str(tiny_model_dir), device="cpu", quantize=3)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the CPU peak is Linux's VmHWM")
def test_a_cpu_peak_counts_memory_that_an_earlier_path_freed():
    """Paths run one after another in one process: the second must not read ~0 MB because it reuses
    the blocks the first freed (the C allocator keeps them unless handed back)."""

    def allocate() -> int:
        chunks = [torch.ones(25_000) for _ in range(3_000)]  # 100 kB each: heap blocks, not mmap; 300 MB
        return len(chunks)

    allocate()
    baseline = reset_peak_memory(torch.device("cpu"))
    allocate()
    assert proc_status_mb("VmHWM") - baseline > 250
