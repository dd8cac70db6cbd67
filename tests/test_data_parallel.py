"""Two CPU processes (torchrun, gloo): evaluation, and training with DDP and with FSDP, equal one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import heft
from conftest import make_heft
from dp_eval_script import evaluate_sets, train_config
from heft.config import config_from_dict
from heft.train import run_training
from test_train import write_toy_boolq

HERE = Path(__file__).resolve().parent


def test_two_processes_evaluate_like_one(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Each process scores half of the batches; the gathered metrics, per-example correctness and
    probabilities equal a single-process evaluation on every process, and `heft train` writes its
    zero-shot line once, with the single-process result. Without the gather each process would hold
    its share only (fewer examples, another accuracy)."""
    data = write_toy_boolq(tmp_path / "data")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(heft.__file__).parents[1]), str(HERE)]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RANK", None)
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(HERE / "dp_eval_script.py"),
        str(tmp_path),
        str(tiny_model_dir),
        str(data),
    ]
    proc = subprocess.Popen(
        launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-3000:]

    single = evaluate_sets(make_heft("llama"))
    assert single["boolq"]["n"] == 19 and single["mc"]["n"] == 11
    for rank in (0, 1):
        shared = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert shared["num_processes"] == 2
        for name in ("boolq", "mc"):
            assert shared[name]["correct"] == single[name]["correct"]
            assert shared[name]["mean_margin"] == pytest.approx(single[name]["mean_margin"], abs=1e-6)
            same = [json.dumps({**r[name], "mean_margin": 0}, sort_keys=True) for r in (shared, single)]  # NaN = NaN
            assert same[0] == same[1]  # n, accuracy, per-class accuracy, acc and acc_norm
            mine, one = shared[f"{name}_probs"], single[f"{name}_probs"]
            assert list(map(len, mine)) == list(map(len, one))
            assert sum(mine, []) == pytest.approx(sum(one, []), abs=1e-6)

    cfg = config_from_dict({**train_config(str(tiny_model_dir), str(data)), "output_dir": str(tmp_path / "one")})
    run_training(cfg, tmp_path / "one", show_progress=False)
    lines = [
        [json.loads(s) for s in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("one", "run")
    ]
    assert [(m["kind"], m["stage_index"]) for m in lines[1]] == [(m["kind"], m["stage_index"]) for m in lines[0]]
    zero_one, zero_two = lines[0][0], lines[1][0]
    assert zero_one["stage"] == zero_two["stage"] == "zero-shot"
    assert zero_two["eval_correct"] == zero_one["eval_correct"] and len(zero_one["eval_correct"]) == 24
    assert zero_two["eval_accuracy"] == zero_one["eval_accuracy"]
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["eval_batch_size"] == 5


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE_FSDP = [
    *[sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--main_process_port", "0"],
    *["--num_cpu_threads_per_process", "1", "--use_fsdp", "--fsdp_sharding_strategy", "FULL_SHARD"],
]
"""`accelerate launch --use_fsdp` itself: every FSDP_* variable it sets, at its defaults (which include
`--fsdp_sync_module_states true`), reaches heft as it does for a user."""


def launch_heft(args: list[str], launcher: list[str] = TORCHRUN, timeout: int = 600) -> tuple[int, str]:
    """`python -m heft ARGS` in two CPU processes (gloo) started by `launcher`; the exit status and the output."""
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(heft.__file__).parents[1]),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    env.pop("RANK", None)
    proc = subprocess.Popen(
        [*launcher, "-m", "heft", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
        output, _ = proc.communicate()
    return proc.returncode, output


def run_files(run: Path) -> dict[str, Path]:
    return {str(p.relative_to(run)): p for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}


FSDP = {"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD"}
"""The two variables of `accelerate launch --use_fsdp --fsdp_sharding_strategy FULL_SHARD` that ask heft to shard."""


@pytest.mark.parametrize("launcher", [TORCHRUN, ACCELERATE_FSDP], ids=["ddp-torchrun", "fsdp-accelerate-launch"])
def test_two_processes_train_what_one_process_trains_with_the_same_global_batch(
    tmp_path, tiny_model_dir, launcher
) -> None:
    """LoRA (merged) → LoReFT under DDP (torchrun), and under FSDP started by `accelerate launch --use_fsdp`
    (FULL_SHARD: each process holds half of every decoder weight; the merge adds into the halves), on two
    CPU processes with batches of 8, against one process
    with batches of 8 and grad_accum 2 (global batch 16 both ways; process i takes batches i, i+2...
    of the one-process order, as the two micro-batches of each accumulated step). Without dropout the
    two runs compute the same steps: every loss, evaluation and saved weight agrees to float32
    rounding (the gradient all-reduce sums in another order), and the run folders hold the same files."""
    from safetensors.torch import load_file

    from test_train import toy_config, write_toy_boolq

    data = write_toy_boolq(tmp_path / "data", 32, 16)
    base = toy_config(tiny_model_dir, data, tmp_path / "unused")
    base["stages"][1]["reft"]["dropout"] = 0.0
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(base))
    status, output = launch_heft(["train", str(config), "--output-dir", str(tmp_path / "two"), "-q"], launcher)
    assert status == 0, output[-3000:]
    sharded = 2 if launcher is ACCELERATE_FSDP else 0
    assert output.count("FSDP: every decoder layer sharded over 2 processes") == sharded, output[-3000:]
    one = config_from_dict({**base, "grad_accum": 2, "output_dir": str(tmp_path / "one")})
    run_training(one, tmp_path / "one", show_progress=False)

    runs = [tmp_path / "one", tmp_path / "two"]
    files = [run_files(run) for run in runs]
    assert files[0].keys() == files[1].keys() and any(name.endswith(".safetensors") for name in files[0])
    lines = [[json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()] for run in runs]
    assert [(m["kind"], m["stage_index"], m["epoch"], m["step"]) for m in lines[0]] == [
        (m["kind"], m["stage_index"], m["epoch"], m["step"]) for m in lines[1]
    ]
    for mine, theirs in zip(*lines):
        for key in ("train_loss", "boundary_loss", "eval_mean_margin"):
            if mine.get(key) is not None:
                assert theirs[key] == pytest.approx(mine[key], rel=1e-5, abs=1e-6), (key, mine["stage"])
        assert mine.get("eval_correct") == theirs.get("eval_correct")
    results = [json.loads((run / "results.json").read_text()) for run in runs]
    for key in ("optimizer_steps", "train_tokens", "final_accuracy"):
        assert results[0][key] == results[1][key], key
    assert results[0]["stages"][0]["loss_at_end"] < results[0]["stages"][0]["loss_at_start"]  # it trained
    for name in (n for n in files[0] if n.endswith(".safetensors")):
        mine, theirs = load_file(files[0][name]), load_file(files[1][name])
        assert mine.keys() == theirs.keys()
        for key in mine:
            torch.testing.assert_close(theirs[key], mine[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


def test_fsdp_settings_heft_does_not_run_are_refused_before_anything_loads(monkeypatch) -> None:
    from heft.sharding import ShardingError, check_launch, fsdp_hidden_from_accelerate

    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_SHARDING_STRATEGY", "FSDP_RESHARD_AFTER_FORWARD"):
        monkeypatch.delenv(name, raising=False)
    assert check_launch(quantized=True) is False  # DDP runs, quantized or not
    for name, value in FSDP.items():
        monkeypatch.setenv(name, value)
    assert check_launch(quantized=False) is True
    with fsdp_hidden_from_accelerate():
        assert "ACCELERATE_USE_FSDP" not in os.environ  # accelerate builds no FSDP plugin of its own
    assert os.environ["ACCELERATE_USE_FSDP"] == "true"
    with pytest.raises(ShardingError, match="FSDP with 'quantize'"):
        check_launch(quantized=True)
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(ShardingError, match="offload_params"):
        check_launch(quantized=False)
    monkeypatch.delenv("FSDP_OFFLOAD_PARAMS")
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP")
    with pytest.raises(ShardingError, match="SHARD_GRAD_OP: heft shards with FULL_SHARD only"):
        check_launch(quantized=False)
    monkeypatch.setenv("FSDP_VERSION", "2")  # accelerate reads FSDP_RESHARD_AFTER_FORWARD instead
    assert check_launch(quantized=False) is True
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    with pytest.raises(ShardingError, match="SHARD_GRAD_OP: heft shards with FULL_SHARD only"):
        check_launch(quantized=False)
