"""`heft reproduce`: the paper's BoolQ comparison (arXiv 2509.09801) as one resumable command.

Every arm (LoRA, LoReFT, joint and HEFT at 20 and at 3 epochs) trains the same model on the same
subsample, seeds, max length and evaluation set, into `<output_dir>/<arm>/seed-<s>/`. Finished
arms are read back, interrupted ones resume (the training recipe does that). All budget numbers
come from each run's `results.json` and `metrics.jsonl`, never from estimates, and end up in
`summary.json`, `report.md`, `accuracy_vs_epoch.png` and `accuracy_vs_tokens.png`.

The zero-shot accuracy depends only on the base model and the evaluation set, so it is evaluated
once per seed, by the first arm that runs in a call, and read from whichever arm holds it.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import math
import os
import platform
import reprlib
import shlex
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from heft.config import ConfigError, RunConfig, Source, apply_override, config_from_dict, config_to_dict, load_config, read_yaml
from heft.io import atomic_write_text, versions, write_json
from heft.train import run_training

log = logging.getLogger("heft")

PAPER = {"heft-2+1": (3, 85.17), "lora-20": (20, 85.05), "loreft-20": (20, 83.36)}
"""(epochs, BoolQ accuracy %) from arXiv 2509.09801 (Llama-2-7B, full BoolQ), keyed by our arm names."""
TOP_KEYS = ("preset", "base", "seeds", "presets", "arms", "arms_only", "output_dir")
PRESET_KEYS = ("base", "seeds", "epochs")
RESERVED = ("stages", "seed", "output_dir", "eval_every", "eval_zero_shot")
"""RunConfig fields set per arm by reproduce itself, so `base` may not set them."""


# ------------------------------------------------------------------------------------ the plan
@dataclass
class Plan:
    """The reproduce file resolved: one validated RunConfig per arm and seed."""

    preset: str
    output_dir: Path
    seeds: list[int]
    configs: dict[str, dict[int, RunConfig]]
    nominal_epochs: dict[str, list[float]]
    """Per-stage epochs as the arm is defined, before a preset scales them (for grouping)."""
    selected: list[str]
    """Arms this call trains (`arms_only`); the others are only read back if finished."""

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.output_dir / arm / f"seed-{seed}"


def _check(ok: bool, value: Any, key: tuple, src: Source, expected: str) -> None:
    if not ok:
        src.fail(f"bad value {reprlib.repr(value)} for '{'.'.join(map(str, key))}'", key, expected)


def _mapping(value: Any, key: tuple, src: Source, allowed: Sequence[str] | None = None) -> dict:
    """`value` as a mapping whose keys are all in `allowed`, or a one-line error with a suggestion."""
    _check(isinstance(value, dict), value, key, src, "a mapping")
    for name in value:
        if allowed is not None and name not in allowed:
            close = difflib.get_close_matches(str(name), allowed, n=1)
            src.fail(f"unknown key '{'.'.join(map(str, (*key, name)))}'", (*key, name),
                     hint=f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(allowed))
    return value


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _resolve(data: dict, src: Source) -> tuple[str, dict, dict[str, list[float]]]:
    """The chosen preset merged into the file: (preset, {base, seeds, arms, ...}, nominal epochs)."""
    presets = _mapping(data.get("presets", {}), ("presets",), src)
    preset = data.get("preset")
    _check(isinstance(preset, str) and preset in presets, preset, ("preset",), src,
           "one of " + ", ".join(map(str, presets)))
    chosen = _mapping(presets[preset], ("presets", preset), src, PRESET_KEYS)
    arms = _mapping(data.get("arms"), ("arms",), src)
    _check(bool(arms), arms, ("arms",), src, "at least one arm")
    nominal = {}
    for arm, spec in arms.items():
        stages = _mapping(spec, ("arms", arm), src, ("stages",)).get("stages")
        _check(isinstance(stages, list) and bool(stages) and all(isinstance(s, dict) for s in stages),
               stages, ("arms", arm, "stages"), src, "a non-empty list of stage mappings")
        nominal[arm] = [s.get("epochs", 1.0) for s in stages]
        for i, e in enumerate(nominal[arm]):
            _check(type(e) in (int, float) and e > 0, e, ("arms", arm, "stages", i, "epochs"), src, "a number > 0")
    base = _merge(_mapping(data.get("base", {}), ("base",), src),
                  _mapping(chosen.get("base", {}), ("presets", preset, "base"), src))
    resolved = {"base": base, "seeds": chosen.get("seeds", data.get("seeds", [1])), "arms": copy.deepcopy(arms),
                "arms_only": data.get("arms_only"), "output_dir": data.get("output_dir", "runs/reproduce-{preset}")}
    for arm, epochs in _mapping(chosen.get("epochs", {}), ("presets", preset, "epochs"), src, list(arms)).items():
        stages = resolved["arms"][arm]["stages"]
        _check(isinstance(epochs, list) and len(epochs) == len(stages), epochs, ("presets", preset, "epochs", arm), src,
               f"a list of {len(stages)} epoch count(s), one per stage of arm '{arm}'")
        for stage, e in zip(stages, epochs):
            stage["epochs"] = e
    return preset, resolved, nominal


def load_plan(config_path: str | Path, overrides: Sequence[str] = (), output_dir: str | Path | None = None) -> Plan:
    """Read a reproduce file, apply `key=value` overrides, resolve the preset, validate every arm.

    Overrides are applied to the file (so `preset=full` picks the preset) and again after the
    preset is merged, so an explicit `seeds=[1,2]` or `base.batch_size=4` wins over the preset.
    """
    path = Path(config_path)
    raw, node = read_yaml(path)
    src = Source(str(path), node)
    data = copy.deepcopy(_mapping(raw, (), src, TOP_KEYS))
    for text in overrides:
        apply_override(data, text, {}, src)
    preset, resolved, nominal = _resolve(_mapping(data, (), src, TOP_KEYS), src)
    for text in overrides:
        if text.partition("=")[0].split(".")[0] in resolved:
            apply_override(resolved, text, {}, Source(str(path)))

    base, seeds, only, arms = resolved["base"], resolved["seeds"], resolved["arms_only"], resolved["arms"]
    for name in base:
        if name in RESERVED:
            src.fail(f"key 'base.{name}' is set by reproduce per arm", ("base", name), hint="remove it")
    _check(isinstance(seeds, list) and bool(seeds) and all(type(s) is int for s in seeds)
           and len(set(seeds)) == len(seeds), seeds, ("seeds",), src, "a non-empty list of distinct integers")
    _check(only is None or (isinstance(only, list) and bool(only)), only, ("arms_only",), src,
           "null or a list of arm names")
    for i, arm in enumerate(only or []):
        close = difflib.get_close_matches(str(arm), list(arms), n=1)
        _check(arm in arms, arm, ("arms_only", i), src,
               "one of " + ", ".join(arms) + (f" (did you mean '{close[0]}'?)" if close else ""))
    selected = [arm for arm in arms if only is None or arm in only]
    out = Path(output_dir if output_dir is not None else str(resolved["output_dir"]).replace("{preset}", preset))
    configs: dict[str, dict[int, RunConfig]] = {}
    for arm, spec in arms.items():
        configs[arm] = {}
        for seed in seeds:
            run = {**copy.deepcopy(base), "stages": spec["stages"], "seed": seed, "eval_every": "epoch",
                   "eval_zero_shot": arm == selected[0],  # once per seed and call: see the module docstring
                   "output_dir": str(out / arm / f"seed-{seed}")}
            configs[arm][seed] = config_from_dict(run, source=f"{path} (preset {preset}, arm {arm})")
    return Plan(preset, out, seeds, configs, nominal, selected)


# ------------------------------------------------------------------------------------- running
def _check_same_config(run_dir: Path, cfg: RunConfig) -> None:
    """Refuse to resume or reuse a folder trained with other settings (e.g. another subsample)."""
    if not (run_dir / "config.yaml").is_file():
        return
    ignore = ("eval_zero_shot", "output_dir")
    saved = {k: v for k, v in config_to_dict(load_config(run_dir / "config.yaml")).items() if k not in ignore}
    wanted = {k: v for k, v in config_to_dict(cfg).items() if k not in ignore}
    if saved != wanted:
        differ = ", ".join(k for k in wanted if saved.get(k) != wanted[k])
        raise ConfigError(f"{run_dir} holds a run with different settings ({differ}); "
                          "choose another output_dir or delete that folder")


def reproduce(config_path: str, overrides: Sequence[str] = (), output_dir: str | None = None,
              show_progress: bool = True) -> dict:
    """Train every selected arm and seed not yet finished, then write the summary, report and plots.

    Returns the content of `summary.json`.
    """
    plan = load_plan(config_path, overrides, output_dir)
    for seed in plan.seeds:  # seed-major: a partial multi-seed run already holds a full comparison
        for arm in plan.selected:
            run_dir, cfg = plan.run_dir(arm, seed), plan.configs[arm][seed]
            _check_same_config(run_dir, cfg)
            if (run_dir / "results.json").is_file():
                log.info("%s seed %d: finished earlier, read back from %s", arm, seed, run_dir)
                continue
            log.info("%s seed %d: training into %s", arm, seed, run_dir)
            run_training(cfg, run_dir, show_progress)
    summary = summarize(plan)
    summary.update(config=str(config_path), overrides=list(overrides), command=shlex.join(sys.argv))
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(plan.output_dir / "summary.json", summary)
    atomic_write_text(plan.output_dir / "report.md", render_report(summary))
    plot(summary, plan.output_dir)
    log.info("wrote %s/summary.json, report.md and plots", plan.output_dir)
    return summary


# ------------------------------------------------------------------------------------- summary
def _stats(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None}


def _run_summary(run_dir: Path, cfg: RunConfig) -> dict:
    """One arm and seed: accuracy per cumulative epoch (counted across stages) and exact budgets."""
    results = json.loads((run_dir / "results.json").read_text())
    lines: dict[tuple, dict] = {}
    for text in (run_dir / "metrics.jsonl").read_text().splitlines():
        if text.strip():
            m = json.loads(text)
            lines[(m["stage_index"], m["epoch"])] = m  # one line per epoch (resume drops unsaved ones)
    offsets = [0]
    for stage in cfg.stages:
        offsets.append(offsets[-1] + math.ceil(stage.epochs))
    curve, previous = [], 0
    for (index, epoch), m in lines.items():
        if index >= 0 and epoch is not None:
            curve.append({"epoch": offsets[index] + epoch, "stage": m["stage"], "method": cfg.stages[index].method,
                          "accuracy": m["eval_accuracy"], "train_loss": m["train_loss"], "train_tokens": m["tokens_seen"],
                          "epoch_train_tokens": m["tokens_seen"] - previous, "elapsed_s": m["elapsed_s"]})
            previous = m["tokens_seen"]
    best = max(curve, key=lambda c: c["accuracy"])  # the earliest epoch among ties
    return {
        "run_dir": str(run_dir),
        "final_accuracy": results["final_accuracy"],
        "best_accuracy": best["accuracy"],
        "best_epoch": best["epoch"],
        "curve": curve,
        "zero_shot_accuracy": lines[(-1, None)]["eval_accuracy"] if (-1, None) in lines else None,
        "majority_accuracy": results["majority_accuracy"],
        "train_tokens": results["train_tokens"],
        "eval_tokens": results["eval_tokens"],
        "evaluations": len(lines),
        "optimizer_steps": results["optimizer_steps"],
        "trainable_params": [{k: s[k] for k in ("name", "method", "epochs", "trainable_params")}
                             for s in results["stages"]],
        "wall_time_s": results["wall_time_s"],
        "peak_memory_mb": results["peak_memory_mb"],
        "data": results["data"],
    }


def summarize(plan: Plan) -> dict:
    """Per arm and seed, mean ± std over seeds, baselines and the machine, from finished runs."""
    arms, missing, zero_shot, majority, data = {}, [], {}, {}, None
    for arm, by_seed in plan.configs.items():
        runs = {}
        for seed, cfg in by_seed.items():
            if (plan.run_dir(arm, seed) / "results.json").is_file():
                runs[seed] = run = _run_summary(plan.run_dir(arm, seed), cfg)
                majority.setdefault(seed, run["majority_accuracy"])
                data = data or run["data"]
                if run["zero_shot_accuracy"] is not None:
                    zero_shot.setdefault(seed, run["zero_shot_accuracy"])
            else:
                missing.append(f"{arm}/seed-{seed}")
        if not runs:
            continue
        stages = next(iter(by_seed.values())).stages
        arms[arm] = {
            "nominal_epochs": plan.nominal_epochs[arm],
            "epochs": [s.epochs for s in stages],
            "methods": [s.method for s in stages],
            "final_accuracy": _stats([r["final_accuracy"] for r in runs.values()]),
            "best_accuracy": _stats([r["best_accuracy"] for r in runs.values()]),
            "best_epochs": [r["best_epoch"] for r in runs.values()],
            "curve": [{"epoch": points[0]["epoch"], "accuracy": _stats([p["accuracy"] for p in points]),
                       "train_tokens": statistics.fmean(p["train_tokens"] for p in points)}
                      for points in zip(*(r["curve"] for r in runs.values()))],
            **{k: statistics.fmean(r[k] for r in runs.values())
               for k in ("train_tokens", "eval_tokens", "optimizer_steps", "wall_time_s", "peak_memory_mb")},
            "trainable_params": next(iter(runs.values()))["trainable_params"],
            "seeds": {str(s): r for s, r in runs.items()},
        }
    any_cfg = next(iter(next(iter(plan.configs.values())).values()))
    gpu = torch.cuda.is_available()
    return {
        "preset": plan.preset, "model": any_cfg.model, "task": any_cfg.task, "seeds": plan.seeds,
        "output_dir": str(plan.output_dir),
        "data": {**(data or {}), "max_length": any_cfg.max_length, "max_train_examples": any_cfg.max_train_examples,
                 "max_eval_examples": any_cfg.max_eval_examples},
        "majority_accuracy": _stats(list(majority.values())) if majority else None,
        "zero_shot_accuracy": _stats(list(zero_shot.values())) if zero_shot else None,
        "arms": arms, "missing": missing,
        "total_train_wall_time_s": round(sum(r["wall_time_s"] for a in arms.values() for r in a["seeds"].values()), 2),
        "paper": {"model": "Llama-2-7B", "source": "arXiv 2509.09801",
                  "arms": {arm: {"epochs": epochs, "accuracy": acc} for arm, (epochs, acc) in PAPER.items()}},
        "versions": versions(),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "device": "cuda" if gpu else "cpu",
                    "gpu": torch.cuda.get_device_name(0) if gpu else None},
    }


# -------------------------------------------------------------------------------------- report
def _pct(stats: dict | None) -> str:
    if stats is None:
        return "—"
    return f"{100 * stats['mean']:.2f}" + (f" ± {100 * stats['std']:.2f}" if stats.get("std") is not None else "")


def _stages(arm: dict) -> str:
    return " → ".join(f"{m} {e:g}" for m, e in zip(arm["methods"], arm["epochs"]))


def _epochs(arm: dict) -> str:
    total = sum(arm["epochs"])
    return f"{total:g} epoch" + ("" if total == 1 else "s")


def _se(p: float, m: int) -> float:
    """Binomial standard error of an accuracy p measured on m examples."""
    return math.sqrt(p * (1 - p) / m)


def _difference(a: str, b: str, arms: dict, m: int) -> str:
    """`a` against `b` in points, and in units of the binomial standard error of a difference."""
    pa, pb = arms[a]["final_accuracy"]["mean"], arms[b]["final_accuracy"]["mean"]
    diff, noise = pa - pb, math.sqrt(_se(pa, m) ** 2 + _se(pb, m) ** 2)
    ratio = abs(diff) / noise if noise else math.inf
    return (f"{100 * pa:.2f} % vs {100 * pb:.2f} %, {100 * diff:+.2f} points, {ratio:.1f}× the standard error of a "
            f"difference ({100 * noise:.2f} points): {'within' if ratio < 2 else 'beyond'} two standard errors.")


def render_report(summary: dict) -> str:
    """Markdown: the paper's rows beside ours, the equal-budget table, curves, a templated reading."""
    arms, m, data = summary["arms"], summary["data"].get("eval_examples", 0), summary["data"]
    totals = {n: sum(a["nominal_epochs"]) for n, a in arms.items()}
    budget = totals.get("heft-2+1", min(totals.values(), default=0))  # the paper's HEFT budget
    equal = [n for n in arms if totals[n] == budget]
    longer = [n for n in arms if totals[n] > budget]
    out = [f"# BoolQ reproduction: {summary['preset']} preset", "",
           f"Model `{summary['model']}`, {data.get('train_examples', '?')} training / {m} evaluation examples "
           f"(max length {data['max_length']}), seeds {summary['seeds']}, on {summary['machine']['device']}"
           f"{' (' + summary['machine']['gpu'] + ')' if summary['machine']['gpu'] else ''}. Accuracy in %, final epoch; "
           "± is the standard deviation over seeds.", ""]
    if summary["missing"]:
        out += [f"**Not finished yet:** {', '.join(summary['missing'])}.", ""]
    out += ["## Beside the paper (Llama-2-7B, full BoolQ)", "",
            "| arm | paper epochs | paper | our epochs | ours (final) | ours (best, epoch) |",
            "|---|---|---|---|---|---|"]
    for arm, (epochs, acc) in PAPER.items():
        if arm in arms:
            a = arms[arm]
            out.append(f"| {arm} ({_stages(a)}) | {epochs} | {acc:.2f} | {sum(a['epochs']):g} "
                       f"| {_pct(a['final_accuracy'])} | {_pct(a['best_accuracy'])} "
                       f"(epoch {', '.join(map(str, a['best_epochs']))}) |")
    out += ["", f"## Equal budget: {budget:g} epochs as defined", "",
            "| arm | stages (epochs run) | final | best | train tokens | optimizer steps | trainable params per stage "
            "| wall time (s) |", "|---|---|---|---|---|---|---|---|"]
    for arm in equal:
        a = arms[arm]
        params = " + ".join(f"{p['trainable_params']:,}" for p in a["trainable_params"])
        out.append(f"| {arm} | {_stages(a)} | {_pct(a['final_accuracy'])} | {_pct(a['best_accuracy'])} "
                   f"| {a['train_tokens']:,.0f} | {a['optimizer_steps']:.0f} | {params} | {a['wall_time_s']:.0f} |")
    if longer:
        run = max(c["epoch"] for a in longer for c in arms[a]["curve"])
        marks = [e for e in (3, 5, 10, 20) if e <= run] or list(range(1, run + 1))
        out += ["", "## Longer arms along the way", "", "| arm | " + " | ".join(f"epoch {e}" for e in marks) + " |",
                "|---|" + "---|" * len(marks)]
        for arm in longer:
            acc = {c["epoch"]: c["accuracy"] for c in arms[arm]["curve"]}
            out.append(f"| {arm} | " + " | ".join(_pct(acc.get(e)) for e in marks) + " |")
    out += ["", "## Baselines", "", f"- Majority class: {_pct(summary['majority_accuracy'])} %",
            f"- Zero-shot (untrained model): {_pct(summary['zero_shot_accuracy'])} %", ""]
    out += ["## Reading", ""]
    if m and arms:
        p = statistics.fmean(a["final_accuracy"]["mean"] for a in arms.values())
        out.append(f"- With M = {m} evaluation examples the binomial standard error sqrt(p(1-p)/M) of one accuracy "
                   f"is about {100 * _se(p, m):.2f} points (at the mean accuracy {100 * p:.2f} %). Two accuracies are "
                   "compared as if independent, which overstates the noise of arms scored on the same examples.")
        for b in ("lora-20", "loreft-20"):
            if "heft-2+1" in arms and b in arms:
                diff = arms["heft-2+1"]["final_accuracy"]["mean"] - arms[b]["final_accuracy"]["mean"]
                verdict = "beats" if diff > 0 else "trails" if diff < 0 else "ties"
                out.append(f"- heft-2+1 ({_epochs(arms['heft-2+1'])} run) {verdict} {b} ({_epochs(arms[b])} run) "
                           f"here: {_difference('heft-2+1', b, arms, m)}")
        ranked = sorted(equal, key=lambda n: arms[n]["final_accuracy"]["mean"], reverse=True)
        if len(ranked) > 1:
            out.append(f"- At the equal budget the best arm is {ranked[0]} and the worst {ranked[-1]}: "
                       + _difference(ranked[0], ranked[-1], arms, m))
        for b in ("lora-20", "loreft-20"):
            gap = (PAPER["heft-2+1"][1] - PAPER[b][1]) / 100
            ratio = gap / (math.sqrt(2) * _se(p, m))
            out.append(f"- The paper's margin of HEFT over {b} ({100 * gap:+.2f} points) would be {ratio:.2f}× "
                       f"the standard error of a difference here, so {m} evaluation examples {'can' if ratio >= 2 else 'cannot'} "
                       "resolve a gap of that size.")
        spread = {n: a["final_accuracy"]["std"] for n, a in arms.items() if a["final_accuracy"]["std"] is not None}
        if spread:
            worst = max(spread, key=spread.get)
            out.append(f"- Over {len(summary['seeds'])} seeds the final accuracy of an arm varies by a standard "
                       f"deviation of up to {100 * spread[worst]:.2f} points ({worst}).")
        if summary["majority_accuracy"]:
            q = summary["majority_accuracy"]["mean"]
            above = [n for n, a in arms.items() if (p_arm := a["final_accuracy"]["mean"]) - q > 2 * _se(p_arm, m)]
            out.append(f"- {len(above)} of {len(arms)} arms end more than two standard errors above the majority class "
                       f"({100 * q:.2f} %){': ' + ', '.join(above) if above else ''}.")
    out += ["", "What these numbers do not show:",
            f"- The paper's setting: it used Llama-2-7B (7B parameters) on all 9,427 training examples; this run used "
            f"{summary['model']} on {data.get('train_examples', '?')} training examples, so the scale of model (and maybe "
            "data) differs and the paper's ranking need not carry over.",
            "- Tuned hyperparameters: every arm uses fixed settings from the config; none was tuned here.",
            "- 'Best' picks an epoch on the evaluation set itself, so it is optimistic; 'final' is the fair number."]
    if len(summary["seeds"]) == 1:
        out.append("- Seed variance: one seed only, so no spread over seeds is measured.")
    if any(a["epochs"] != a["nominal_epochs"] for a in arms.values()):
        out.append(f"- The arms' real lengths: the {summary['preset']} preset scales epochs down (see 'our epochs'), "
                   "so arm names state the defined, not the run, epochs.")
    return "\n".join(out) + "\n"


def plot(summary: dict, folder: Path) -> None:
    """Accuracy against cumulative epochs and against training tokens, one line per arm (seed mean)."""
    data, zero, majority = summary["data"], summary["zero_shot_accuracy"], summary["majority_accuracy"]
    title = (f"BoolQ, {summary['preset']} preset: {summary['model']}, N={data.get('train_examples', '?')} train / "
             f"{data.get('eval_examples', '?')} eval, seeds {summary['seeds']}")
    for x_key, label, name in (("epoch", "epochs (cumulative over stages)", "accuracy_vs_epoch.png"),
                               ("train_tokens", "training tokens forwarded (cumulative)", "accuracy_vs_tokens.png")):
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.add_subplot()
        n = len(summary["arms"])
        for i, (arm, a) in enumerate(summary["arms"].items()):
            width = 1.2 + 2.4 * (n - 1 - i) / max(n - 1, 1)  # later arms thinner: coinciding curves stay visible
            ax.plot([c[x_key] for c in a["curve"]], [100 * c["accuracy"]["mean"] for c in a["curve"]], linewidth=width,
                    marker="s" if len(a["methods"]) > 1 else "o", markersize=2 + width, alpha=0.85, label=arm)
        if majority:
            ax.axhline(100 * majority["mean"], color="grey", linestyle="--", label="majority class")
        if zero:
            ax.plot([0], [100 * zero["mean"]], "k*", markersize=12, label="zero-shot")
        if x_key == "epoch":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel=label, ylabel="evaluation accuracy (%)", title=title)
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.savefig(folder / name, dpi=120)
