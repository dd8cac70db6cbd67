"""Data-parallel evaluation: two CPU processes (torchrun, gloo) score the same as one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
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
