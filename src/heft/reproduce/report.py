"""`report.md`: the paper's rows beside ours, the equal-budget table and a reading of the differences.

Any reproduce config renders: its arms, its `compare` pairs and its `paper:` block (the published
setting and numbers, keyed by our arm names) are data in the summary. `render_report` joins one
function per section.
"""

from __future__ import annotations

import math
import statistics

COMPARISONS_TITLE = "Paired comparisons (final evaluations, example by example)"


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


def _paper_task(summary: dict) -> bool:
    """Whether this run is on the paper's own task (else the paper's numbers are another task's)."""
    paper = summary.get("paper")
    return bool(paper) and summary["task"] == paper["task"]


def budget_groups(arms: dict, paper: dict | None) -> tuple[float, list[str], list[str]]:
    """(budget, arms at it, longer arms): the paper's method's total epochs as defined, else the
    budget most arms share."""
    totals = {n: sum(a["nominal_epochs"]) for n, a in arms.items()}
    method = paper["method"]["arm"] if paper else None
    budget = totals.get(method, max(totals.values(), key=list(totals.values()).count, default=0))
    return budget, [n for n in arms if totals[n] == budget], [n for n in arms if totals[n] > budget]


def header_section(summary: dict) -> list[str]:
    data = summary["data"]
    out = [
        f"# {summary['task']}: {summary.get('config', 'reproduce')}, {summary['preset']} preset",
        "",
        f"Model `{summary['model']}`, {data.get('train_examples', '?')} training / {data.get('eval_examples', 0)} "
        f"evaluation examples from {data.get('eval_split', 'validation')} "
        f"(max length {data['max_length']}), seeds {summary['seeds']}, trained on "
        f"{', '.join(summary.get('trained_on') or ['not recorded'])}. Accuracy in %, final epoch; "
        "± is the standard deviation over seeds.",
        "",
    ]
    if summary["missing"]:
        out += [f"**Not finished yet:** {', '.join(summary['missing'])}.", ""]
    return out


def paper_section(summary: dict) -> list[str]:
    """The paper's arms beside ours, on the paper's own task only."""
    paper, arms = summary.get("paper"), summary["arms"]
    beside = [arm for arm in paper["arms"] if arm in arms] if _paper_task(summary) else []
    if not beside:
        return []
    out = [
        f"## Beside the paper ({paper['model']}, full {paper['task_name']})",
        "",
        "| arm | paper epochs | paper | our epochs | ours (final) | ours (best, epoch) |",
        "|---|---|---|---|---|---|",
    ]
    for arm in beside:
        row, a = paper["arms"][arm], arms[arm]
        out.append(
            f"| {arm} ({_stages(a)}) | {row['epochs']} | {row['accuracy']:.2f} | {sum(a['epochs']):g} "
            f"| {_pct(a['final_accuracy'])} | {_pct(a['best_accuracy'])} "
            f"(epoch {', '.join(map(str, a['best_epochs']))}) |"
        )
    return out


def equal_budget_section(summary: dict) -> list[str]:
    arms = summary["arms"]
    budget, equal, _ = budget_groups(arms, summary.get("paper"))
    out = [
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
    return out


def milestones(evaluated: list[int], budget: float = 3) -> list[int]:
    """Columns of the longer arms' table: the equal budget (the paper's HEFT budget, 3), then epochs
    5, 10 and 20 where every longer arm evaluated them all, else the epochs they all evaluated,
    thinned to six."""
    if not evaluated:
        return []
    preferred = [e for e in (budget, 5, 10, 20) if e <= evaluated[-1]]
    if preferred and set(preferred) <= set(evaluated):
        return preferred
    return evaluated[::-1][:: math.ceil(len(evaluated) / 6)][::-1]


def longer_arms_section(summary: dict) -> list[str]:
    """Accuracy of the arms above the equal budget at the milestones they all evaluated."""
    arms = summary["arms"]
    budget, _, longer = budget_groups(arms, summary.get("paper"))
    if not longer:
        return []
    evaluated = sorted(set.intersection(*({c["epoch"] for c in arms[a]["curve"]} for a in longer)))
    marks = milestones(evaluated, budget)
    out = [
        "",
        "## Longer arms along the way",
        "",
        "| arm | " + " | ".join(f"epoch {e:g}" for e in marks) + " |",
        "|---|" + "---|" * len(marks),
    ]
    for arm in longer:
        acc = {c["epoch"]: c["accuracy"] for c in arms[arm]["curve"]}
        out.append(f"| {arm} | " + " | ".join(_pct(acc.get(e)) for e in marks) + " |")
    return out


def baselines_section(summary: dict) -> list[str]:
    return [
        "",
        "## Baselines",
        "",
        f"- Majority class: {_pct(summary['majority_accuracy'])} %",
        f"- Zero-shot (untrained model): {_pct(summary['zero_shot_accuracy'])} %",
        "",
    ]


def comparisons_section(comparisons: list[dict], title: str = COMPARISONS_TITLE, intro: str = "") -> list[str]:
    """A table of paired comparisons: difference, interval, per-seed differences, McNemar, verdict."""
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


def last_stage_section(summary: dict) -> list[str]:
    return comparisons_section(
        summary.get("last_stage_gains", []),
        "What the last stage adds (example by example)",
        "Each multi-stage arm's final evaluation against that of the model its last stage "
        "received (the end of the stage before it), on the same examples and seeds. ",
    )


def boundaries_section(arms: dict) -> list[str]:
    """Loss on fixed training batches and accuracy where each stage starts and ends (seed means)."""
    if not any(r.get("boundaries") for a in arms.values() for r in a["seeds"].values()):
        return []  # summaries from before boundaries were recorded
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


def paper_margin_lines(summary: dict) -> list[str]:
    """The paper's margin of its method over each other paper arm, against our paired interval."""
    paper, arms = summary.get("paper"), summary["arms"]
    if not paper or paper["method"]["arm"] not in arms:
        return []
    method, on_task, out = paper["method"], _paper_task(summary), []
    for b in (arm for arm in paper["arms"] if arm != method["arm"] and arm in arms):
        gap = (paper["arms"][method["arm"]]["accuracy"] - paper["arms"][b]["accuracy"]) / 100
        c = next((c for c in summary.get("comparisons", []) if (c["a"], c["b"]) == (method["arm"], b)), None)
        if c is None:
            continue  # no per-example records to pair
        half = (c["high"] - c["low"]) / 2
        out.append(
            f"- The paper's {'' if on_task else paper['task_name'] + ' '}margin of {method['name']} over {b} "
            f"({100 * gap:+.2f} points{'' if on_task else ', a scale from another task'}) against the half-width "
            f"of our paired interval ({100 * half:.2f} points): a gap of the paper's size "
            f"{'can' if abs(gap) > half else 'cannot'} be resolved here."
        )
    return out


def majority_line(summary: dict) -> list[str]:
    """How many arms end clearly above the majority class."""
    arms, m = summary["arms"], summary["data"].get("eval_examples", 0)
    if not summary["majority_accuracy"]:
        return []
    q = summary["majority_accuracy"]["mean"]
    above = [n for n, a in arms.items() if (p_arm := a["final_accuracy"]["mean"]) - q > 2 * _se(p_arm, m)]
    return [
        f"- {len(above)} of {len(arms)} arms end more than two binomial standard errors above the "
        f"majority class ({100 * q:.2f} %){': ' + ', '.join(above) if above else ''}."
    ]


def reading_section(summary: dict) -> list[str]:
    out = ["## Reading", ""]
    for c in summary.get("comparisons", []) + summary.get("last_stage_gains", []):
        out.append("- " + _comparison(c))
    if summary["data"].get("eval_examples", 0) and summary["arms"]:
        out += paper_margin_lines(summary) + majority_line(summary)
    return out


def paper_setting_line(summary: dict) -> list[str]:
    paper = summary.get("paper")
    if not paper:
        return []
    if _paper_task(summary):
        return [
            f"- The paper's setting: it used {paper['model']} ({paper['parameters']} parameters) on all "
            f"{paper['train_examples']:,} training examples; this run used {summary['model']} on "
            f"{summary['data'].get('train_examples', '?')} training examples, so the scale of model (and maybe data) "
            "differs and the paper's ranking need not carry over."
        ]
    return [
        f"- The paper's setting: it reports {paper['task_name']} only, with {paper['model']} "
        f"({paper['parameters']} parameters); this run used {summary['model']} on {summary['task']}, so neither "
        "the model nor the task is the paper's and its ranking need not carry over."
    ]


def limits_section(summary: dict) -> list[str]:
    """What these numbers do not show."""
    out = [
        "",
        "What these numbers do not show:",
        *paper_setting_line(summary),
        "- Tuned hyperparameters: every arm uses fixed settings from the config; none was tuned here.",
        "- 'Best' picks an epoch on the evaluation set itself, so it is optimistic; 'final' is the fair number.",
    ]
    if len(summary["seeds"]) == 1:
        out.append("- Seed variance: one seed only, so no spread over seeds is measured.")
    if any(a["epochs"] != a["nominal_epochs"] for a in summary["arms"].values()):
        out.append(
            f"- The arms' real lengths: the {summary['preset']} preset scales epochs down (see 'our epochs'), "
            "so arm names state the defined, not the run, epochs."
        )
    return out


def render_report(summary: dict) -> str:
    """Markdown: the paper's rows beside ours, the equal-budget table, curves, a templated reading."""
    sections = [
        header_section(summary),
        paper_section(summary),
        equal_budget_section(summary),
        longer_arms_section(summary),
        baselines_section(summary),
        comparisons_section(summary.get("comparisons", [])),
        last_stage_section(summary),
        boundaries_section(summary["arms"]),
        reading_section(summary),
        limits_section(summary),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"
