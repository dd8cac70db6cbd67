"""`heft` command line: train, eval, predict, export, info, reproduce, bench, plan.

User mistakes (bad config, missing file, unknown model, bad data) end in one readable line and a
hint, with exit status 2; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console()
errors = Console(stderr=True, soft_wrap=True)
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)


def _auto_or_int(text: str) -> str | int:
    """`auto` or a whole number ≥ 1: options heft can also choose itself; argparse reports the rest."""
    if text == "auto":
        return text
    if not text.strip().isdecimal() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number ≥ 1, not {text!r}")
    return int(text)


def _run_dir_config(run_dir: Path):
    from heft.config import load_config

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is {run_dir} a run folder written by `heft train`?")
    return load_config(path)


def _output_dir(given: str | None, cfg) -> str:
    """The run folder: `--output-dir`, else the config's template filled in. Under a launcher every
    process takes the main process's name: processes that start in different seconds would
    otherwise time-stamp different folders."""
    from heft.evaluate import process_state
    from heft.tasks import get_task

    if given:
        return given
    task_name = get_task(cfg.task).name  # a mapping's name, or its kind's
    out = cfg.output_dir.format(task=task_name, model=Path(cfg.model).name, time=time.strftime("%Y%m%d-%H%M%S"))
    if process_state().num_processes > 1:
        from accelerate.utils import broadcast_object_list

        out = broadcast_object_list([out], from_process=0)[0]
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from heft.config import load_config
    from heft.evaluate import process_state
    from heft.tasks import task_for
    from heft.train import run_training

    cfg = load_config(args.config, args.overrides)
    task = task_for(cfg)  # a bad task or template ends here, before a run folder exists
    out = cfg.output_dir = _output_dir(args.output_dir, cfg)
    args.resume_with = shlex.join(
        ["heft", "train", args.config, *args.overrides, "--output-dir", out]
    )  # the folder name has a time stamp
    is_main = process_state().is_main_process  # under torchrun / `accelerate launch` only the main process reports
    if is_main:
        console.print(f"[bold]heft train[/] {args.config} → {out}")
    results = run_training(cfg, out, show_progress=not args.quiet)
    if not is_main:
        return 0
    console.print(train_table(results, task.name, cfg.boundary_examples))
    for line in paired_lines(results):
        console.print(line, highlight=False, markup=False)
    for stage in results["stages"]:
        if stage.get("rollback_reason"):
            console.print(f"stage {stage['name']} rolled back: {stage['rollback_reason']}")
    console.print(
        f"data: {results['data']['source']}  ({results['data']['train_examples']} train, "
        f"truncated {results['data']['train_truncated']})"
    )
    console.print(
        f"run folder: {out}   wall time {results['wall_time_s']:.0f} s, {results['train_tokens']:,} training tokens"
    )
    return 0


def _eval_data(run_dir: Path, split: str | None, max_examples: int | None, model):
    """The run's config and task, the split evaluated and its encoded examples."""
    from heft.tasks import task_for

    cfg = _run_dir_config(run_dir)
    task = task_for(cfg)
    run_split = task.eval_split(cfg.data)
    split = split or run_split
    if split == cfg.data.train_split == run_split:  # the run's held-out examples, not training ones
        from heft.data import read_splits
        from heft.tasks.data import subsample

        encoded, _ = task.encode(read_splits(task, cfg).evaluation, model.tokenizer, cfg.max_length)  # not the rest
        return cfg, task, split, encoded if max_examples is None else subsample(encoded, max_examples, cfg.seed)
    limit = max_examples if max_examples is not None else cfg.max_eval_examples
    rows = task.load_split(cfg.data, split, limit, cfg.seed)
    encoded, _ = task.encode(rows, model.tokenizer, cfg.max_length)
    return cfg, task, split, encoded


def _load_for_eval(run_dir: Path, base_model: str | None = None, zero_shot: bool = False):
    """The run's model (`zero_shot`: its base model without the stages) on this process's device, and
    whether this process reports. Under torchrun / `accelerate launch` every process scores a share of
    the examples on its own device; only the main process prints or writes."""
    from heft.evaluate import process_state
    from heft.io import load_run

    state = process_state()
    model = load_run(run_dir, base_model=base_model, zero_shot=zero_shot)
    return model.to(state.device), state.is_main_process  # a GPU when there is one


def cmd_eval(args: argparse.Namespace) -> int:
    from heft.evaluate import evaluate, generate_answers, generation_metrics

    if args.lm_eval:
        return _lm_eval(args)
    run_dir = Path(args.run_dir)
    model, is_main = _load_for_eval(run_dir, args.base_model, args.zero_shot)
    cfg, task, split, encoded = _eval_data(run_dir, args.split, args.max_examples, model)
    generated = task.scoring == "generation"  # completion tasks are always evaluated by generating
    if args.mode == "generate" and not generated:
        answers = generate_answers(model, task, encoded, args.batch_size or cfg.eval_batch_size, bf16=cfg.bf16)
        result = generation_metrics(answers, encoded)
    else:
        result = evaluate(model, task, encoded, batch_size=args.batch_size or cfg.eval_batch_size, bf16=cfg.bf16)
    if is_main:
        print(
            json.dumps(
                {
                    "run_dir": str(run_dir),
                    "split": split,
                    "mode": "generate" if generated else args.mode,
                    **({"zero_shot": True} if args.zero_shot else {}),
                    **result,
                },
                indent=2,
            )
        )
    return 0


def _lm_eval(args: argparse.Namespace) -> int:
    """`heft eval RUN --lm-eval TASKS`: lm-eval's tasks on the run's model; its results JSON (and the
    per-document samples, its log) go into the run folder, its table to the console."""
    from heft.evaluate import process_state

    clashing = [flag for flag, value in (("--split", args.split), ("--max-examples", args.max_examples)) if value]
    if clashing or args.mode != "score":
        raise ValueError(
            f"--lm-eval runs its tasks' own splits and scoring; drop {clashing or ['--mode generate']} "
            "(--lm-eval-limit N takes each task's first N documents)"
        )
    if args.lm_eval_limit is not None and args.lm_eval_limit < 1:
        raise ValueError(f"--lm-eval-limit must be at least 1, not {args.lm_eval_limit}")
    if process_state().num_processes > 1:
        raise ValueError("--lm-eval runs in one process; start it without torchrun / accelerate launch")
    from heft.lm_eval_bridge import find_tasks, lm_eval_logs, results_table, run_lm_eval, write_results

    run_dir = Path(args.run_dir)
    cfg = _run_dir_config(run_dir)
    stem = f"lm-eval-{time.strftime('%Y%m%d-%H%M%S')}"
    with lm_eval_logs(run_dir / f"{stem}.log", args.verbose):
        tasks = find_tasks(  # an unknown task or a missing data file fails before the model loads
            [name.strip() for name in args.lm_eval.split(",") if name.strip()],
            [Path(folder) for folder in args.lm_eval_include or []],
        )
        model, _ = _load_for_eval(run_dir, args.base_model, args.zero_shot)
        batch_size = args.batch_size or cfg.eval_batch_size
        results = run_lm_eval(model, tasks, batch_size=batch_size, bf16=cfg.bf16, limit=args.lm_eval_limit)
    print(results_table(results))
    path, samples = write_results(results, run_dir, stem)
    console.print(f"wrote {path} and {samples.name} ({'zero-shot base model' if args.zero_shot else 'the run'})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from heft.tasks import task_for
    from heft.tasks.data import parse_rows, read_query_rows

    run_dir = Path(args.run_dir)
    cfg = _run_dir_config(run_dir)
    task = task_for(cfg)
    if args.input:  # rows are checked before the model loads
        lines = read_query_rows(Path(args.input))
        queries = parse_rows(lines, lambda values: task.to_query(values, cfg.data.template))
        rows = [line.values for line in lines]
    elif args.prompt is not None or args.question:
        given = {"prompt": args.prompt, "question": args.question, "passage": args.passage, "choices": args.choices}
        rows = [{k: v for k, v in given.items() if v is not None}]
        queries = [task.to_query(rows[0], cfg.data.template)]
    else:
        raise ValueError(
            "give --prompt (completion), --question with --passage (BoolQ) or --choices (multiple choice), "
            "or --input FILE.jsonl"
        )
    model, is_main = _load_for_eval(run_dir, args.base_model)
    encoded, _ = task.encode(queries, model.tokenizer, cfg.max_length)
    answers = _answers(model, task, queries, encoded, cfg, args.max_new_tokens, progress=len(rows) > 1)
    if not is_main:
        return 0
    records = [{**row, **answer} for row, answer in zip(rows, answers)]
    if args.output:
        Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        console.print(f"wrote {len(records)} predictions to {args.output}")
    else:
        for answer in answers:
            print(json.dumps(answer))
    return 0


def _answers(model, task, queries, encoded, cfg, max_new_tokens: int | None, progress: bool) -> list[dict]:
    """Per query, the prediction: a generated response (completion), else the likeliest choice and its probability."""
    from heft.evaluate import generate_responses, predict

    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: expected a value > 0")
    if task.scoring == "generation":
        responses = generate_responses(
            model, task, encoded, cfg.eval_batch_size, cfg.bf16, progress, max_new_tokens=max_new_tokens
        )
        return [{"prediction": response.strip()} for response in responses]
    predictions = predict(model, task, encoded, cfg.eval_batch_size, progress=progress, bf16=cfg.bf16)
    return [
        {"prediction": query.choices[p.predicted].strip(), "probability": round(p.probs[p.predicted], 6)}
        for query, p in zip(queries, predictions)
    ]


def cmd_export(args: argparse.Namespace) -> int:
    from heft.io import export_run

    out = export_run(args.run_dir, args.out_dir, base_model=args.base_model)
    console.print(f"exported {args.run_dir} → {out} (merged base model + ReFT stages; see {out}/HEFT_EXPORT.md)")
    return 0


BASELINES = {"final_vs_zero_shot": "zero-shot", "final_vs_majority_class": "majority class"}
"""results.json's `paired` keys, as `heft train` names the baselines."""


def train_table(results: dict, task_name: str, boundary_examples: int) -> Table:
    """`heft train`'s summary: per stage where it starts and ends. Short headers, and second lines
    where a cell has more to say (a merge that moved the loss, a rollback), keep it within 80 columns:
    no terminal wraps it."""
    table = Table(
        title=f"{task_name}, {results['data']['eval_examples']} eval examples: loss on the first {boundary_examples} "
        "training examples (eval mode) and accuracy, where each stage starts → ends"
    )
    for column in ("model", "params", "loss", "accuracy"):
        table.add_column(column, justify="left" if column == "model" else "right")
    if results["zero_shot_accuracy"] is not None:
        table.add_row("zero-shot", "0", "", f"{results['zero_shot_accuracy']:.4f}")
    for stage in results["stages"]:
        state = "\nrolled back" if stage.get("rolled_back") else ""
        table.add_row(
            f"{stage['name']} ({stage['epochs']:g} ep){state}",
            f"{stage['trainable_params']:,}",
            _loss_span(stage.get("loss_at_start"), stage.get("loss_before_merge"), stage.get("loss_at_end"), "\n"),
            f"{_num(stage.get('accuracy_at_start'))} → {_num(stage['accuracy'])}",
        )
    table.add_row("majority class", "", "", f"{results['majority_accuracy']:.4f}")
    return table


def paired_lines(results: dict) -> list[str]:
    """The final model against each baseline on the same examples (results.json's `paired`): the
    difference, its bootstrap interval and McNemar's p, in lines of at most 80 characters."""
    paired = results.get("paired") or {}
    if not paired:
        return []
    n = next(iter(paired.values()))["examples"]
    lines = [f"final model vs baselines, paired on the {n} eval examples (95 % CI, McNemar):"]
    for key, c in paired.items():
        points = f"{100 * c['difference']:+6.2f} points [{100 * c['low']:+.2f}, {100 * c['high']:+.2f}]"
        lines.append(f"  {BASELINES[key]:<15}{points}, p = {c['p']:.2g} ({c['a_only']} won, {c['b_only']} lost)")
    return lines


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def _loss_span(start: float | None, before_merge: float | None, end: float | None, sep: str = ", ") -> str:
    """`start → end`, with the loss just before the merge when merging changed it (a quantized base, or
    bf16 rounding of the merged weights), after `sep`: a newline keeps a narrow table narrow."""
    if before_merge is None or end is None or abs(end - before_merge) < 5e-5:
        return f"{_num(start)} → {_num(end)}"
    return f"{_num(start)} → {_num(before_merge)}{sep}merged {_num(end)} ({end - before_merge:+.4f})"


def _base_text(base: dict) -> str:
    """`float32`, or e.g. `float32, 4-bit nf4 by bitsandbytes, compute bfloat16` for a quantized base."""
    q = base.get("quantize")
    if q is None:
        return base["dtype"]
    if q["bits"] == 4:
        return f"{base['dtype']}, 4-bit {q['quant_type']} by {q['backend']}, compute {q['compute_dtype']}"
    return f"{base['dtype']}, 8-bit LLM.int8() by {q['backend']}"


def _stages_table(manifest: dict, lines: list) -> Table:
    """Each stage's state, and its loss and accuracy at the start and end, from the metrics lines."""
    from heft.metrics import boundary_summary

    table = Table(title="stages (loss on fixed training batches, eval accuracy: where each stage starts → ends)")
    for column in ("stage", "epochs", "lr", "params", "state", "loss", "accuracy"):
        table.add_column(column)
    previous_end: float | None = None
    for stage in manifest["stages"]:
        cfg, index = stage["config"], stage["index"]
        bounds = boundary_summary(lines, index)
        state = (
            "rolled back"
            if stage.get("rolled_back")
            else "merged"
            if stage["merged"]
            else "frozen"
            if stage["finished"]
            else "training"
        )
        start, end = bounds["loss_at_start"], bounds["loss_at_end"]
        loss = _loss_span(start, bounds["loss_before_merge"], end)
        if start is not None and previous_end is not None and start > previous_end + 1e-4:
            loss = f"[red]{loss} (jump +{start - previous_end:.4f} at the boundary)[/]"
        accuracy = f"{_num(bounds['accuracy_at_start'])} → {_num(bounds['accuracy'])}"
        init = (
            f" ({cfg['reft'].get('init', 'random')} init)" if stage["method"] in ("loreft", "direft", "joint") else ""
        )
        table.add_row(
            stage["name"] + init,
            f"{cfg['epochs']:g}",
            f"{cfg['lr']:g}",
            f"{stage['trainable_params']:,}",
            state,
            loss,
            accuracy,
        )
        previous_end = end if not stage.get("rolled_back") else previous_end
        if bounds["rollback_reason"]:
            table.add_row("", "", "", "", "", f"rolled back: {bounds['rollback_reason']}", "")
    return table


def cmd_info(args: argparse.Namespace) -> int:
    from heft.io import read_manifest

    run_dir = Path(args.run_dir)
    manifest = read_manifest(run_dir)
    base = manifest["base_model"]
    console.print(
        f"[bold]{run_dir}[/]  base model {base['id']} ({_base_text(base)}, sha256 {base['sha256'][:12]}…)  "
        f"seed {manifest['seed']}"
    )
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))
    from heft.metrics import read_metrics

    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    table = _stages_table(manifest, read_metrics(run_dir / "metrics.jsonl"))
    console.print(table)
    if results:
        console.print(
            f"final accuracy {results['final_accuracy']:.4f} (majority {results['majority_accuracy']:.4f}), "
            f"{results['train_tokens']:,} training tokens, {results['optimizer_steps']} steps, "
            f"{results['wall_time_s']:.0f} s"
        )
    if manifest.get("checkpoint"):
        console.print("[yellow]unfinished run: `heft train` with its config.yaml and output_dir resumes it[/]")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from heft.reproduce import ReproduceJobsFailed, reproduce

    overrides = [*args.overrides, *([f"arms_only=[{','.join(args.only)}]"] if args.only else [])]
    args.resume_with = "the same command"
    try:
        summary = reproduce(
            args.config,
            overrides,
            args.output_dir,
            show_progress=not args.quiet,
            train=not args.report_only,
            jobs=args.jobs,
        )
    except ReproduceJobsFailed as err:
        errors.print(
            f"[red]error:[/] {escape(str(err))}\n[dim]the report covers the finished arms; "
            "rerun the same command to retry the failed ones[/]",
            highlight=False,
            markup=True,
        )
        return 1
    folder = (summary.get("reread") or summary)["output_dir"]  # a re-read summary keeps where its runs were
    console.print(f"summary: {folder}/summary.json, report: {folder}/report.md")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from heft.bench import run_bench, tables

    if args.check:
        return _bench_check(args)
    record = run_bench(
        args.model,
        batches=args.batches,
        batch_size=args.batch_size,
        max_length=args.max_length,
        device=args.device,
        paths=args.paths.split(","),
        repeats=args.repeats,
        warmup=args.warmup,
        threads=args.threads,
        clock=args.clock,
        activation_checkpointing=args.activation_checkpointing,
        compile_mode=args.compile,
        pad_to_multiple_of=args.pad_to_multiple_of,
        dtype=args.dtype,
        quantize=args.quantize,
        synthetic=args.synthetic,
        fast_dropout=args.fast_dropout,
        plan=args.plan,
    )
    for table in tables(record):
        console.print(table)
    _write_bench(record, args.json, "bench")
    return 0


def _write_bench(record: dict, path: str | None, prefix: str) -> None:
    out = Path(path or f"runs/{prefix}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {out}")


def _bench_check(args: argparse.Namespace) -> int:
    """Rerun the baseline's measurement, then compare ratios; exit 1 when a path slowed, 3 when
    the baseline comes from another machine (nothing is run then, unless --force)."""
    import torch

    from heft import bench
    from heft.bench_check import (
        NOT_COMPARABLE,
        baseline_settings,
        check_table,
        compare,
        data_differences,
        exit_status,
        machine_differences,
    )

    path = Path(args.check)
    baseline = json.loads(path.read_text(encoding="utf-8"))
    settings = baseline_settings(baseline, str(path))
    device = torch.device(settings["device"])
    if settings["threads"]:  # before the machine is compared: a one-thread baseline is rerun on one thread
        torch.set_num_threads(settings["threads"])
    if device.type == "cuda" and not torch.cuda.is_available():
        reasons = [f"device: {settings['device']!r} in the baseline, no GPU here"]
    else:
        reasons = machine_differences(baseline, {"machine": bench.machine_info(device)})
    if reasons and not args.force:
        errors.print(
            f"[yellow]not comparable[/]: {escape(str(path))} was measured on another machine:\n  "
            + "\n  ".join(map(escape, reasons))
            + "\n[dim]ratios are compared on the same machine only; "
            "--force runs and shows them anyway[/]"
        )
        return NOT_COMPARABLE
    record = bench.run_bench(**settings)
    reasons += data_differences(baseline, record)
    for table in bench.tables(record):
        console.print(table)
    changes = compare(baseline, record, args.tolerance / 100)
    console.print(check_table(changes, args.tolerance / 100, reasons, path.name))
    _write_bench(record, args.json, "bench-check")
    status = exit_status(changes, reasons)
    if status == 1:
        errors.print(
            "[red]slower[/]: " + ", ".join(f"{c.name} {c.metric} {100 * c.change:+.1f} %" for c in changes if c.slower)
        )
    return status


def cmd_plan(args: argparse.Namespace) -> int:
    from heft.config import load_config
    from heft.memory_plan import advice, default_target_tokens, plan_run, plan_tables, resolve_device
    from heft.tasks import get_task

    device = resolve_device(args.device, args.gpu_memory)  # a bad --gpu-memory fails before anything is read
    cfg = load_config(args.config, args.overrides)
    targets = args.target_tokens or default_target_tokens(get_task(cfg.task))
    plan = plan_run(cfg, device, targets)
    for table in plan_tables(plan):
        console.print(table)
    for line in advice(plan):
        console.print(line, highlight=False)
    return 0


def _base_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-model",
        metavar="ID_OR_PATH",
        help="load the base model from here, not from the id the run recorded (e.g. a local copy of a "
        "hub model); its weights must have the recorded sha256",
    )


def heft_version() -> str:
    from heft import __version__

    return __version__


def _add_train_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the stages of a YAML config into a run folder")
    p.add_argument("config", help="YAML config, e.g. configs/boolq_heft.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.0.epochs=3 max_train_examples=500")
    p.add_argument("--output-dir", help="run folder (default: the config's output_dir)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def _add_eval_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a saved run")
    p.add_argument("run_dir")
    p.add_argument("--split", help="split to evaluate (default: the run's eval split)")
    p.add_argument("--max-examples", type=int, help="stratified subsample (default: the run's max_eval_examples)")
    p.add_argument(
        "--mode", choices=["score", "generate"], default="score", help="log-likelihood scoring or greedy generation"
    )
    p.add_argument("--batch-size", type=int)
    p.add_argument(
        "--zero-shot",
        action="store_true",
        help="evaluate the run's base model without its stages (the model the run started from)",
    )
    p.add_argument(
        "--lm-eval",
        metavar="TASK[,TASK...]",
        help="run lm-evaluation-harness tasks instead (heft ships arc_easy, arc_challenge, openbookqa and boolq, "
        "read from $HEFT_DATA_DIR); writes lm-eval-<time>.json into the run folder",
    )
    p.add_argument(
        "--lm-eval-include",
        action="append",
        metavar="DIR",
        help="also look for lm-eval task YAMLs in DIR (repeatable); they take precedence",
    )
    p.add_argument("--lm-eval-limit", type=int, metavar="N", help="only the first N documents of each lm-eval task")
    _base_model_option(p)
    p.set_defaults(func=cmd_eval)


def _add_predict_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="answer questions with a saved run")
    p.add_argument("run_dir")
    p.add_argument("--prompt", help="a prompt to respond to (completion tasks)")
    p.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="longest response generated (completion; default: the task's)"
    )
    p.add_argument("--question")
    p.add_argument("--passage")
    p.add_argument("--choices", nargs="+", metavar="CHOICE", help="the answers to choose from (multiple-choice tasks)")
    p.add_argument(
        "--input",
        help="JSONL file with the task's fields per line (question and passage, question and choices, "
        "or a completion prompt: prompt, instruction and input, or messages)",
    )
    p.add_argument("--output", help="JSONL file for the predictions (default: print)")
    _base_model_option(p)
    p.set_defaults(func=cmd_predict)


def _add_export_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the base model with LoRA merged, plus the ReFT stages")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    _base_model_option(p)
    p.set_defaults(func=cmd_export)


def _add_info_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show what a run folder holds")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_info)


def _add_reproduce_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="run the paper's comparison (several arms) and write a report")
    p.add_argument("config", help="e.g. configs/reproduce_boolq.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. preset=smoke seeds=[1,2]")
    p.add_argument("--output-dir")
    p.add_argument(
        "--only", nargs="+", metavar="ARM", help="train only these arms (the others are read back if finished)"
    )
    p.add_argument(
        "--jobs",
        type=_auto_or_int,
        default=1,
        metavar="N",
        help="train arms and seeds in N processes side by side (one GPU runs several small-model jobs well); "
        "auto: as many as the free memory holds at the arms' peaks that `heft plan` traces",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write summary, report and plots from the arms finished so far "
        "(also while another process trains into the folder)",
    )
    p.set_defaults(func=cmd_reproduce)


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="tokens/s, MFU and peak memory of each path against this machine's GEMM peak",
        description="Measures this machine's bf16/fp32 GEMM peak at the model's shapes, then tokens/s, MFU "
        "and peak memory of heft's paths and of transformers + peft LoRA, on the same BoolQ "
        "batches (read as `heft train` reads them: HEFT_DATA_DIR or the Hub).",
    )
    p.add_argument("--model", default="smollm2-135m", help="alias, local folder or hub id (default: smollm2-135m)")
    p.add_argument("--batches", type=int, default=12, help="timed batches per path (default: 12)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument(
        "--paths",
        default="scoring,lora,peft-lora,loreft,joint",
        help="comma-separated subset of the default (all paths)",
    )
    p.add_argument("--repeats", type=int, default=10, help="timed rounds per GEMM shape (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per path before the timed batches")
    _bench_model_options(p)
    _bench_clock_and_record_options(p)
    p.set_defaults(func=cmd_bench)


def _bench_model_options(p: argparse.ArgumentParser) -> None:
    """How `heft bench` builds and trains the model: the same knobs as a run config's."""
    p.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="training paths recompute each layer in the backward pass (less memory, more compute)",
    )
    p.add_argument(
        "--compile",
        metavar="MODE",
        help="torch.compile heft's training paths in this mode (default, "
        "reduce-overhead or max-autotune-no-cudagraphs), as `compile:` in a run config; warm-up s then "
        "includes the compilation",
    )
    p.add_argument(
        "--pad-to-multiple-of",
        type=_auto_or_int,
        default="auto",
        metavar="N",
        help="round batch widths up to a multiple of N, as `pad_to_multiple_of:` in a run config "
        "(default: auto, 64 on CUDA and none on the CPU)",
    )
    p.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="the base's weights (default: float32)"
    )
    p.add_argument(
        "--quantize",
        type=int,
        metavar="BITS",
        help="load the base in 4 (nf4) or 8 bits with bitsandbytes for every path; peft-lora is then QLoRA",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="random token ids of full length instead of BoolQ: a random model saved without a tokenizer "
        "(training paths only)",
    )
    p.add_argument(
        "--fast-dropout",
        action="store_true",
        help="heft's LoRA and joint paths with lora.fast_dropout (cheaper masks than peft's; peft-lora unchanged)",
    )
    p.add_argument("--plan", action="store_true", help="heft plan's peak memory beside each of heft's training paths")


def _bench_clock_and_record_options(p: argparse.ArgumentParser) -> None:
    """How `heft bench` measures, where it writes, and the comparison with a committed record."""
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core)")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall time, or this process's CPU time on a machine shared with other jobs (use with --threads 1)",
    )
    p.add_argument("--json", help="output file (default: runs/bench-<time>.json)")
    p.add_argument(
        "--check",
        metavar="BASELINE.json",
        help="rerun with the settings of a committed record (the options above are ignored) and compare each "
        "path's MFU and heft LoRA ÷ peft LoRA with it; exit 1 when one fell by more than --tolerance, "
        "3 when the baseline comes from another machine",
    )
    p.add_argument(
        "--tolerance", type=float, default=10.0, metavar="PCT", help="allowed fall of a ratio in %% (default: 10)"
    )
    p.add_argument(
        "--force", action="store_true", help="with --check: run and compare even on another machine (exit 3)"
    )


def _add_plan_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="the memory each stage of a config needs, and what fits, from the model's config alone",
        description="Builds the model from its config.json on the meta device (no weights are read), traces "
        "one training step of each stage on fake tensors and prints per stage the weights, adapter, gradients, "
        "optimizer state, activations (with and without activation checkpointing), logits and peak, then "
        "which batch fits in 24, 40 and 80 GB with float32/bf16 weights and an 8- or 4-bit base.",
    )
    p.add_argument("config", help="YAML config, e.g. configs/boolq_heft.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. model=configs/models/llama-2-7b")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", help="cpu, cuda, cuda:1 ... whose memory to plan for (default: cuda if available)")
    where.add_argument("--gpu-memory", metavar="SIZE", help="plan for a GPU of this size, e.g. 24GB, 40GiB, 80000MB")
    p.add_argument(
        "--target-tokens",
        type=int,
        metavar="N",
        help="loss tokens per example (default: 1 for first-token tasks such as BoolQ, 32 for phrase answers)",
    )
    p.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="heft", description="Hierarchical parameter-efficient fine-tuning (LoRA → ReFT)."
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show other libraries' logs and warnings, and a traceback for user errors",
    )
    parser.add_argument("--version", action="version", version=f"heft {heft_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train_command(sub)
    _add_eval_command(sub)
    _add_predict_command(sub)
    _add_export_command(sub)
    _add_info_command(sub)
    _add_reproduce_command(sub)
    _add_bench_command(sub)
    _add_plan_command(sub)
    return parser


HINTS = {
    "ConfigError": "check the key against configs/README.md",
    "DataError": "set data.source or HEFT_DATA_DIR to a folder with train/validation files",
    "ModelNotFoundError": "use a hub id, a local model folder, or the alias smollm2-135m",
    "RunFolderError": "pass a folder written by `heft train`",
    "RunFolderBusy": "wait for that process to end, or write into another folder",
    "SaveError": "free space or fix the folder's permissions, then resume from the last save",
    "FileExistsError": "choose another output folder",
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("heft").setLevel(logging.INFO)
    if getattr(args, "quiet", False):
        from heft.models import hide_library_progress_bars

        hide_library_progress_bars()
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if args.verbose:
            raise
        kind = type(err).__name__
        message = str(err).splitlines()[0] if str(err) else kind
        hint = getattr(err, "hint", None) or HINTS.get(kind)  # a DataError knows the hint for its cause
        if kind == "SaveError" and getattr(args, "resume_with", None):
            hint += f" with {args.resume_with}"
        errors.print(
            f"[red]error:[/] {escape(message)}" + (f"\n[dim]hint: {escape(hint)}[/]" if hint else ""),
            highlight=False,
            markup=True,
        )
        return 2
    except KeyboardInterrupt:
        resume = getattr(args, "resume_with", None)  # set by the commands that train
        errors.print(
            "[yellow]interrupted[/]"
            + (f": the last completed epoch is saved; resume with {escape(resume)}" if resume else ""),
            highlight=False,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
