"""`heft` command line: train, eval, predict, export, info, reproduce, bench.

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

    if given:
        return given
    out = cfg.output_dir.format(task=cfg.task, model=Path(cfg.model).name, time=time.strftime("%Y%m%d-%H%M%S"))
    if process_state().num_processes > 1:
        from accelerate.utils import broadcast_object_list

        out = broadcast_object_list([out], from_process=0)[0]
    return out


def cmd_train(args: argparse.Namespace) -> int:
    from heft.config import load_config
    from heft.evaluate import process_state
    from heft.train import run_training

    cfg = load_config(args.config, args.overrides)
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
    table = Table(
        title=f"{cfg.task}: {results['data']['eval_examples']} eval examples; loss on the first "
        f"{cfg.boundary_examples} training examples (eval mode)"
    )
    for column in ("after", "trainable params", "loss at start → end", "accuracy at start → end"):
        table.add_column(column, justify="right" if column != "after" else "left")
    if results["zero_shot_accuracy"] is not None:
        table.add_row("zero-shot", "0", "", f"{results['zero_shot_accuracy']:.4f}")
    for stage in results["stages"]:
        name = f"stage {stage['name']} ({stage['epochs']:g} ep)" + (
            " [rolled back]" if stage.get("rolled_back") else ""
        )
        table.add_row(
            name,
            f"{stage['trainable_params']:,}",
            f"{_num(stage.get('loss_at_start'))} → {_num(stage.get('loss_at_end'))}",
            f"{_num(stage.get('accuracy_at_start'))} → {_num(stage['accuracy'])}",
        )
    table.add_row("majority class", "", "", f"{results['majority_accuracy']:.4f}")
    console.print(table)
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
    from heft.tasks import get_task

    cfg = _run_dir_config(run_dir)
    task = get_task(cfg.task)
    split = split or cfg.data.eval_split
    if split == cfg.data.train_split == cfg.data.eval_split:  # the run's held-out examples, not training ones
        from heft.tasks.data import subsample
        from heft.train import read_splits

        encoded, _ = task.encode(read_splits(task, cfg).evaluation, model.tokenizer, cfg.max_length)  # not the rest
        return cfg, task, encoded if max_examples is None else subsample(encoded, max_examples, cfg.seed)
    limit = max_examples if max_examples is not None else cfg.max_eval_examples
    rows = task.load_split(cfg.data, split, limit, cfg.seed)
    encoded, _ = task.encode(rows, model.tokenizer, cfg.max_length)
    return cfg, task, encoded


def _load_for_eval(run_dir: Path, base_model: str | None = None):
    """The run's model on this process's device, and whether this process reports. Under torchrun /
    `accelerate launch` every process scores a share of the examples on its own device; only the
    main process prints or writes."""
    from heft.evaluate import process_state
    from heft.io import load_run

    state = process_state()
    return load_run(run_dir, base_model=base_model).to(state.device), state.is_main_process  # a GPU when there is one


def cmd_eval(args: argparse.Namespace) -> int:
    from heft.evaluate import evaluate, generate_answers, generation_metrics

    run_dir = Path(args.run_dir)
    model, is_main = _load_for_eval(run_dir, args.base_model)
    cfg, task, encoded = _eval_data(run_dir, args.split, args.max_examples, model)
    if args.mode == "generate":
        answers = generate_answers(model, task, encoded, args.batch_size or cfg.eval_batch_size, bf16=cfg.bf16)
        result = generation_metrics(answers, encoded)
    else:
        result = evaluate(model, task, encoded, batch_size=args.batch_size or cfg.eval_batch_size, bf16=cfg.bf16)
    if is_main:
        print(
            json.dumps(
                {"run_dir": str(run_dir), "split": args.split or cfg.data.eval_split, "mode": args.mode, **result},
                indent=2,
            )
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from heft.evaluate import predict
    from heft.tasks import get_task
    from heft.tasks.data import parse_rows, read_query_rows

    run_dir = Path(args.run_dir)
    cfg = _run_dir_config(run_dir)
    task = get_task(cfg.task)
    if args.input:  # rows are checked before the model loads
        lines = read_query_rows(Path(args.input))
        queries = parse_rows(lines, lambda values: task.to_query(values, cfg.data.template))
        rows = [line.values for line in lines]
    elif args.question:
        given = {"question": args.question, "passage": args.passage, "choices": args.choices}
        rows = [{k: v for k, v in given.items() if v is not None}]
        queries = [task.to_query(rows[0], cfg.data.template)]
    else:
        raise ValueError("give --question with --passage (BoolQ) or --choices (multiple choice), or --input FILE.jsonl")
    model, is_main = _load_for_eval(run_dir, args.base_model)
    encoded, _ = task.encode(queries, model.tokenizer, cfg.max_length)
    predictions = predict(model, task, encoded, cfg.eval_batch_size, progress=len(rows) > 1, bf16=cfg.bf16)
    if not is_main:
        return 0
    records = [
        {**row, "prediction": query.choices[p.predicted].strip(), "probability": round(p.probs[p.predicted], 6)}
        for row, query, p in zip(rows, queries, predictions)
    ]
    if args.output:
        Path(args.output).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        console.print(f"wrote {len(records)} predictions to {args.output}")
    else:
        for record in records:
            print(json.dumps({"prediction": record["prediction"], "probability": record["probability"]}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from heft.io import export_run

    out = export_run(args.run_dir, args.out_dir, base_model=args.base_model)
    console.print(f"exported {args.run_dir} → {out} (merged base model + ReFT stages; see {out}/HEFT_EXPORT.md)")
    return 0


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def cmd_info(args: argparse.Namespace) -> int:
    from heft.io import read_manifest

    run_dir = Path(args.run_dir)
    manifest = read_manifest(run_dir)
    base = manifest["base_model"]
    console.print(
        f"[bold]{run_dir}[/]  base model {base['id']} ({base['dtype']}, sha256 {base['sha256'][:12]}…)  "
        f"seed {manifest['seed']}"
    )
    console.print("versions: " + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))
    from heft.train import boundary_summary, read_metrics

    results = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
    table = Table(title="stages (loss on fixed training batches, eval accuracy: where each stage starts → ends)")
    for column in ("stage", "epochs", "lr", "params", "state", "loss", "accuracy"):
        table.add_column(column)
    lines = read_metrics(run_dir / "metrics.jsonl")
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
        loss = f"{_num(start)} → {_num(end)}"
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

    if args.jobs < 1:
        raise ValueError(f"--jobs must be at least 1, not {args.jobs}")
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
        args.batches,
        args.batch_size,
        args.max_length,
        args.device,
        args.paths.split(","),
        args.repeats,
        args.warmup,
        threads=args.threads,
        clock=args.clock,
        activation_checkpointing=args.activation_checkpointing,
        compile_mode=args.compile,
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


def _base_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--base-model",
        metavar="ID_OR_PATH",
        help="load the base model from here, not from the id the run recorded (e.g. a local copy of a "
        "hub model); its weights must have the recorded sha256",
    )


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
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the stages of a YAML config into a run folder")
    p.add_argument("config", help="YAML config, e.g. configs/boolq_heft.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. stages.0.epochs=3 max_train_examples=500")
    p.add_argument("--output-dir", help="run folder (default: the config's output_dir)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a saved run")
    p.add_argument("run_dir")
    p.add_argument("--split", help="split to evaluate (default: the run's eval split)")
    p.add_argument("--max-examples", type=int, help="stratified subsample (default: the run's max_eval_examples)")
    p.add_argument(
        "--mode", choices=["score", "generate"], default="score", help="log-likelihood scoring or greedy generation"
    )
    p.add_argument("--batch-size", type=int)
    _base_model_option(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="answer questions with a saved run")
    p.add_argument("run_dir")
    p.add_argument("--question")
    p.add_argument("--passage")
    p.add_argument("--choices", nargs="+", metavar="CHOICE", help="the answers to choose from (multiple-choice tasks)")
    p.add_argument(
        "--input", help="JSONL file with the task's fields per line (question and passage, or question and choices)"
    )
    p.add_argument("--output", help="JSONL file for the predictions (default: print)")
    _base_model_option(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write the base model with LoRA merged, plus the ReFT stages")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    _base_model_option(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="show what a run folder holds")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("reproduce", help="run the paper's comparison (several arms) and write a report")
    p.add_argument("config", help="e.g. configs/reproduce_boolq.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. preset=smoke seeds=[1,2]")
    p.add_argument("--output-dir")
    p.add_argument(
        "--only", nargs="+", metavar="ARM", help="train only these arms (the others are read back if finished)"
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        metavar="N",
        help="train arms and seeds in N processes side by side (one GPU runs several small-model jobs well)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write summary, report and plots from the arms finished so far "
        "(also while another process trains into the folder)",
    )
    p.set_defaults(func=cmd_reproduce)

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
    p.set_defaults(func=cmd_bench)
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
