"""`report.md`: the paper's rows beside ours, the equal-budget table and a reading of the differences."""

from __future__ import annotations

import math
import statistics

from heft.reproduce.summary import PAPER


def _pct(stats: dict | None) -> str:
    if stats is None:
        return "—"
    return f"{100 * stats['mean']:.2f}" + (f" ± {100 * stats['std']:.2f}" if stats.get("std") is not None else "")


def _stages(arm: dict) -> str:
    return " → ".join(f"{m} {e:g}" for m, e in zip(arm["methods"], arm["epochs"]))


def _se(p: float, m: int) -> float:
    """Binomial standard error of an accuracy p measured on m examples (against a constant baseline)."""
    return math.sqrt(p * (1 - p) / m)


def _points(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:+.2f}"


def _verdict(c: dict) -> str:
    if c["low"] > 0:
        return f"{c['a']} better"
    if c["high"] < 0:
        return f"{c['b']} better"
    return "not resolved"


def _comparison(c: dict) -> str:
    """One sentence: the paired difference, its interval, McNemar, and the seeds."""
    spread = f", per seed {', '.join(_points(d) for d in c['per_seed'])}" if c["seeds"] > 1 else ""
    return (
        f"{c['a']} − {c['b']}: {_points(c['difference'])} points [95 % CI {_points(c['low'])}, "
        f"{_points(c['high'])}], McNemar p = {c['mcnemar_p']:.3g} ({c['a_only']} vs {c['b_only']} discordant "
        f"examples of {c['examples']}, {c['seeds']} seed{'s' if c['seeds'] > 1 else ''}{spread}): {_verdict(c)}."
    )


def _comparisons_table(
    comparisons: list[dict], title: str = "Paired comparisons (final evaluations, example by example)", intro: str = ""
) -> list[str]:
    if not comparisons:
        return []
    out = [
        f"## {title}",
        "",
        intro
        + "Difference in accuracy points; 95 % percentile-bootstrap interval over examples (resampled within each "
        "seed); McNemar's exact test on the examples exactly one arm got right.",
        "",
        "| arm | baseline | difference | 95 % CI | per seed | a right, b wrong / b right, a wrong "
        "| McNemar p | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        out.append(
            f"| {c['a']} | {c['b']} | {_points(c['difference'])} | [{_points(c['low'])}, {_points(c['high'])}] "
            f"| {', '.join(_points(d) for d in c['per_seed'])} | {c['a_only']} / {c['b_only']} "
            f"| {c['mcnemar_p']:.3g} | {_verdict(c)} |"
        )
    return out + [""]


def _boundaries_table(arms: dict) -> list[str]:
    """Loss on fixed training batches and accuracy where each stage starts and ends (seed means)."""
    out = [
        "## Stage boundaries",
        "",
        "Loss (eval mode) on the first training examples and evaluation accuracy of the model as each stage "
        "receives it and leaves it; seed means. A start above the previous stage's end is a drop at the boundary.",
        "",
        "| arm | stage | loss at start | loss at end | accuracy at start | accuracy at end |",
        "|---|---|---|---|---|---|",
    ]

    def mean(values: list) -> float | None:
        values = [v for v in values if v is not None]
        return statistics.fmean(values) if values else None

    def fmt(x: float | None, pct: bool = False) -> str:
        return "—" if x is None else (f"{100 * x:.2f}" if pct else f"{x:.4f}")

    for arm, a in arms.items():
        runs = list(a["seeds"].values())
        for i, name in enumerate(b["name"] for b in runs[0].get("boundaries", [])):
            cell = {
                k: mean([r["boundaries"][i][k] for r in runs])
                for k in ("loss_at_start", "loss_at_end", "accuracy_at_start", "accuracy")
            }
            out.append(
                f"| {arm} | {name} | {fmt(cell['loss_at_start'])} | {fmt(cell['loss_at_end'])} "
                f"| {fmt(cell['accuracy_at_start'], True)} | {fmt(cell['accuracy'], True)} |"
            )
    return out + [""]


def milestones(evaluated: list[int]) -> list[int]:
    """Columns of the longer arms' table: epochs 3 (the paper's HEFT budget), 5, 10 and 20 where
    every longer arm evaluated them all, else the epochs they all evaluated, thinned to six."""
    if not evaluated:
        return []
    preferred = [e for e in (3, 5, 10, 20) if e <= evaluated[-1]]
    if preferred and set(preferred) <= set(evaluated):
        return preferred
    return evaluated[::-1][:: math.ceil(len(evaluated) / 6)][::-1]


def render_report(summary: dict) -> str:
    """Markdown: the paper's rows beside ours, the equal-budget table, curves, a templated reading."""
    arms, m, data = summary["arms"], summary["data"].get("eval_examples", 0), summary["data"]
    totals = {n: sum(a["nominal_epochs"]) for n, a in arms.items()}
    # the paper's HEFT budget, else the budget most arms share
    budget = totals.get("heft-2+1", max(totals.values(), key=list(totals.values()).count, default=0))
    equal = [n for n in arms if totals[n] == budget]
    longer = [n for n in arms if totals[n] > budget]
    out = [
        f"# {summary['task']}: {summary.get('config', 'reproduce')}, {summary['preset']} preset",
        "",
        f"Model `{summary['model']}`, {data.get('train_examples', '?')} training / {m} evaluation examples "
        f"from {data.get('eval_split', 'validation')} "
        f"(max length {data['max_length']}), seeds {summary['seeds']}, trained on "
        f"{', '.join(summary.get('trained_on') or ['not recorded'])}. Accuracy in %, final epoch; "
        "± is the standard deviation over seeds.",
        "",
    ]
    if summary["missing"]:
        out += [f"**Not finished yet:** {', '.join(summary['missing'])}.", ""]
    beside = [arm for arm in PAPER if arm in arms] if summary["task"] == "boolq" else []
    if beside:
        out += [
            "## Beside the paper (Llama-2-7B, full BoolQ)",
            "",
            "| arm | paper epochs | paper | our epochs | ours (final) | ours (best, epoch) |",
            "|---|---|---|---|---|---|",
        ]
    for arm in beside:
        (epochs, acc), a = PAPER[arm], arms[arm]
        out.append(
            f"| {arm} ({_stages(a)}) | {epochs} | {acc:.2f} | {sum(a['epochs']):g} "
            f"| {_pct(a['final_accuracy'])} | {_pct(a['best_accuracy'])} "
            f"(epoch {', '.join(map(str, a['best_epochs']))}) |"
        )
    out += [
        "",
        f"## Equal budget: {budget:g} epochs as defined",
        "",
        "| arm | stages (epochs run) | final | best | train tokens | optimizer steps | trainable params per stage "
        "| wall time (s) | trained on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm in equal:
        a = arms[arm]
        params = " + ".join(f"{p['trainable_params']:,}" for p in a["trainable_params"])
        out.append(
            f"| {arm} | {_stages(a)} | {_pct(a['final_accuracy'])} | {_pct(a['best_accuracy'])} "
            f"| {a['train_tokens']:,.0f} | {a['optimizer_steps']:.0f} | {params} | {a['wall_time_s']:.0f} "
            f"| {', '.join(a['trained_on'])} |"
        )
    if longer:
        marks = milestones(sorted(set.intersection(*({c["epoch"] for c in arms[a]["curve"]} for a in longer))))
        out += [
            "",
            "## Longer arms along the way",
            "",
            "| arm | " + " | ".join(f"epoch {e}" for e in marks) + " |",
            "|---|" + "---|" * len(marks),
        ]
        for arm in longer:
            acc = {c["epoch"]: c["accuracy"] for c in arms[arm]["curve"]}
            out.append(f"| {arm} | " + " | ".join(_pct(acc.get(e)) for e in marks) + " |")
    out += [
        "",
        "## Baselines",
        "",
        f"- Majority class: {_pct(summary['majority_accuracy'])} %",
        f"- Zero-shot (untrained model): {_pct(summary['zero_shot_accuracy'])} %",
        "",
    ]
    gains = summary.get("last_stage_gains", [])
    out += _comparisons_table(summary.get("comparisons", []))
    out += _comparisons_table(
        gains,
        "What the last stage adds (example by example)",
        "Each multi-stage arm's final evaluation against that of the model its last stage "
        "received (the end of the stage before it), on the same examples and seeds. ",
    )
    out += _boundaries_table(arms) + ["## Reading", ""]
    for c in summary.get("comparisons", []) + gains:
        out.append("- " + _comparison(c))
    on_boolq = summary["task"] == "boolq"  # the paper reports BoolQ only
    if m and arms:
        for b in ("lora-20", "loreft-20"):
            if b in arms and "heft-2+1" in arms:
                gap = (PAPER["heft-2+1"][1] - PAPER[b][1]) / 100
                c = next((c for c in summary.get("comparisons", []) if (c["a"], c["b"]) == ("heft-2+1", b)), None)
                width = f"{100 * (c['high'] - c['low']) / 2:.2f}" if c else "?"
                out.append(
                    f"- The paper's {'' if on_boolq else 'BoolQ '}margin of HEFT over {b} ({100 * gap:+.2f} "
                    f"points{'' if on_boolq else ', a scale from another task'}) against the half-width "
                    f"of our paired interval ({width} points): a gap of the paper's size "
                    f"{'can' if c and abs(gap) > (c['high'] - c['low']) / 2 else 'cannot'} be resolved here."
                )
        if summary["majority_accuracy"]:
            q = summary["majority_accuracy"]["mean"]
            above = [n for n, a in arms.items() if (p_arm := a["final_accuracy"]["mean"]) - q > 2 * _se(p_arm, m)]
            out.append(
                f"- {len(above)} of {len(arms)} arms end more than two binomial standard errors above the "
                f"majority class ({100 * q:.2f} %){': ' + ', '.join(above) if above else ''}."
            )
    setting = (
        f"- The paper's setting: it used Llama-2-7B (7B parameters) on all 9,427 training examples; this run "
        f"used {summary['model']} on {data.get('train_examples', '?')} training examples, so the scale of model "
        "(and maybe data) differs and the paper's ranking need not carry over."
        if on_boolq
        else f"- The paper's setting: it reports BoolQ only, with Llama-2-7B (7B parameters); this run used "
        f"{summary['model']} on {summary['task']}, so neither the model nor the task is the paper's and its "
        "ranking need not carry over."
    )
    out += [
        "",
        "What these numbers do not show:",
        setting,
        "- Tuned hyperparameters: every arm uses fixed settings from the config; none was tuned here.",
        "- 'Best' picks an epoch on the evaluation set itself, so it is optimistic; 'final' is the fair number.",
    ]
    if len(summary["seeds"]) == 1:
        out.append("- Seed variance: one seed only, so no spread over seeds is measured.")
    if any(a["epochs"] != a["nominal_epochs"] for a in arms.values()):
        out.append(
            f"- The arms' real lengths: the {summary['preset']} preset scales epochs down (see 'our epochs'), "
            "so arm names state the defined, not the run, epochs."
        )
    return "\n".join(out) + "\n"
