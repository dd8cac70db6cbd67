"""`report.md`: the paper's rows beside ours, the equal-budget table and a reading of the differences.

Any reproduce config renders: its arms, its `compare` pairs and its `paper:` block (the published
setting and numbers, keyed by our arm names) are data in the summary. `render_report` joins one
function per section.
"""

from __future__ import annotations

import math
import statistics

from heft.stats import ALPHA, SHARED, WITHIN_SEED

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


def _seeds(seeds: list[int]) -> str:
    return f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"


def _flags(c: dict) -> str:
    """What weakens a pairing: runs on different devices or commits, or a prefix the runs contradict."""
    flags = [
        f"{what} differ ({_seeds(c[key])})"
        for what, key in (("devices", "cross_device_seeds"), ("commits", "cross_commit_seeds"))
        if c.get(key)
    ]
    differ = [int(s) for s, v in ((c.get("prefix") or {}).get("seeds") or {}).items() if v != "same checkpoint"]
    differ = [s for s in differ if c["prefix"]["seeds"][str(s)] in ("different checkpoints", "records differ")]
    if differ:
        flags.append(f"not one prefix ({_seeds(differ)})")
    return "; ".join(flags)


def _name(arm: str, summary: dict) -> str:
    """An arm's name, marked † when its settings were selected by looking at results (`selected_on`)."""
    selection = summary.get("selected_on")
    return f"{arm} †" if selection and arm in selection["arms"] else arm


def _comparison(c: dict, summary: dict) -> str:
    """One sentence: the paired difference, its interval, the test, the decision, and the seeds."""
    spread = f", per seed {', '.join(_points(d) for d in c['per_seed'])}" if c["seeds"] > 1 else ""
    questions = f" ({c['questions']} questions)" if c["unit"] == SHARED else ""
    flags = f"; {_flags(c)}" if _flags(c) else ""
    return (
        f"{_name(c['a'], summary)} − {c['b']}: {_points(c['difference'])} points [95 % CI {_points(c['low'])}, "
        f"{_points(c['high'])}], p = {c['p']:.3g}, adjusted p = {c['p_adjusted']:.3g} ({c['a_only']} vs "
        f"{c['b_only']} discordant of {c['examples']} scored examples{questions}, {c['seeds']} "
        f"seed{'s' if c['seeds'] > 1 else ''}{spread}{flags}): {c['verdict']}."
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
            f"| {_name(arm, summary)} | {_stages(a)} | {_pct(a['final_accuracy'])} | {_pct(a['best_accuracy'])} "
            f"| {a['train_tokens']:,.0f} | {a['optimizer_steps']:.0f} | {params} | {a['wall_time_s']:.0f} "
            f"| {', '.join(a['trained_on'])} |"
        )
    return out + selection_note(summary)


def selection_note(summary: dict) -> list[str]:
    """† beside the arms whose settings were picked by looking at results: what, and on which split."""
    selection = summary.get("selected_on")
    if not selection:
        return []
    where = (
        "on this evaluation set: its accuracy and its comparisons are optimistic (the choice saw these "
        "examples), and the arms it is compared with had no such search"
        if selection["split"] == "eval"
        else "on other examples than this evaluation set (a dev split), which therefore tests the choice"
    )
    return ["", f"† {', '.join(selection['arms'])}: {selection['what']}, chosen {where}."]


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


def method_note(summary: dict) -> str:
    """How the comparisons were computed and decided, from what they record."""
    listed = summary.get("comparisons", []) + summary.get("last_stage_gains", [])
    units, evidence = {c["unit"] for c in listed}, sorted({c["pairing"] for c in listed})
    notes = []
    if SHARED in units:
        notes.append(
            "Where the seeds score the same questions, the question is the unit: the bootstrap resamples "
            "questions with their outcomes in every seed, and p is an exact sign-flip test on each question's "
            "difference summed over the seeds."
        )
    if WITHIN_SEED in units:
        notes.append(
            "Where each seed drew its own examples, the bootstrap resamples examples within each seed, and p is "
            "McNemar's exact test on the examples exactly one arm got right."
        )
    first, decision = listed[0], summary["decision"]
    primary = decision.get("primary")
    rule = (
        f"Holm's correction over the {decision['family']} comparisons this report lists "
        "(both tables; a row listed twice counts once)"
    )
    if primary:
        rule += f"; the primary comparison {primary[0]} − {primary[1]}, declared in the config, keeps its own p"
    return (
        f"Difference in accuracy points. How examples pair: {'; '.join(evidence)}. "
        + " ".join(notes)
        + f" 95 % percentile-bootstrap interval, {first['resamples']:,} resamples, bootstrap seed "
        f"{first['bootstrap_seed']}. Verdict: adjusted p below {ALPHA:g}, with {rule}; otherwise no resolved "
        "difference. The interval is shown, not used as a second test."
    )


def comparisons_section(
    comparisons: list[dict], summary: dict, title: str = COMPARISONS_TITLE, intro: str = ""
) -> list[str]:
    """A table of paired comparisons: difference, interval, per-seed differences, p, adjusted p, verdict.
    The first table of the report says how they were computed and decided; a second refers to it."""
    if not comparisons:
        return []
    first = comparisons is summary.get("comparisons") or not summary.get("comparisons")
    out = [
        f"## {title}",
        "",
        intro + (method_note(summary) if first else "Difference, unit, test and decision rule as in the table above."),
        "",
        "| arm | baseline | difference | 95 % CI | per seed | a right, b wrong / b right, a wrong "
        "| p | adjusted p | verdict | provenance |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in comparisons:
        out.append(
            f"| {_name(c['a'], summary)} | {c['b']} | {_points(c['difference'])} "
            f"| [{_points(c['low'])}, {_points(c['high'])}] | {', '.join(_points(d) for d in c['per_seed'])} "
            f"| {c['a_only']} / {c['b_only']} | {c['p']:.3g} | {c['p_adjusted']:.3g} | {c['verdict']} "
            f"| {_flags(c)} |"
        )
    return out + [""]


def last_stage_section(summary: dict) -> list[str]:
    return comparisons_section(
        summary.get("last_stage_gains", []),
        summary,
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


def _prefix_lines(listed: list[dict]) -> list[str]:
    """Per prefix the plan shares between compared arms: did their runs start from it, seed by seed?"""
    groups: dict[str, dict] = {}
    for c in (c for c in listed if c.get("prefix")):
        group = groups.setdefault(c["prefix"]["planned"], {"arms": {}, "seeds": {}})
        group["arms"].update(dict.fromkeys((c["a"], c["b"])))
        for seed, state in c["prefix"]["seeds"].items():
            group["seeds"].setdefault(seed, {}).setdefault(state, []).append(f"{c['a']} − {c['b']}")
    out = []
    for name, group in groups.items():
        seeds = "; ".join(
            f"seed {seed}: "
            + ", ".join(
                state if len(states) == 1 else f"{state} ({', '.join(pairs)})" for state, pairs in states.items()
            )
            for seed, states in group["seeds"].items()
        )
        contradicted = any(
            state in ("different checkpoints", "records differ")
            for states in group["seeds"].values()
            for state in states
        )
        out.append(
            f"- {', '.join(group['arms'])} branch off one prefix in the plan ({name}); their runs: {seeds}"
            + (". Where they differ, the arms did not start from one model." if contradicted else ".")
        )
    return out


def provenance_section(summary: dict) -> list[str]:
    """What the runs themselves record about the pairs: devices, commits, shared prefixes."""
    counts = summary.get("provenance")
    if not counts or not counts["comparisons"]:
        return []
    listed = summary.get("comparisons", []) + summary.get("last_stage_gains", [])
    out = ["## Provenance", ""]
    for what, key in (("devices", "device"), ("code commits", "commit")):
        crossing = [f"{c['a']} − {c['b']}" for c in listed if c[f"cross_{key}_seeds"]]
        out.append(
            f"- {counts[f'cross_{key}']} of {counts['comparisons']} comparisons pair runs on different {what}"
            + (f" ({'; '.join(crossing)})" if crossing else "")
            + f"; {counts[f'{key}_not_recorded']} pair runs that did not record it, so they are not verified as "
            f"on one {what.split()[-1][:-1]}."
        )
    return out + _prefix_lines(listed) + [""]


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
        out.append("- " + _comparison(c, summary))
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


def tuning_line(summary: dict) -> str:
    """What was tuned, and on which examples (the config's `selected_on`)."""
    selection = summary.get("selected_on")
    if not selection:
        return "- Tuned hyperparameters: every arm uses fixed settings from the config; none was tuned here."
    chosen = f"- Tuned hyperparameters: for {', '.join(selection['arms'])} (marked †), {selection['what']}, chosen"
    if selection["split"] == "eval":
        return (
            f"{chosen} on this evaluation set; every other arm uses fixed settings from the config with no "
            "search. The selected arm's numbers are optimistic until confirmed on examples the choice did not see."
        )
    return (
        f"{chosen} on other examples than this evaluation set, so this set tests the choice; every other arm uses "
        "fixed settings from the config."
    )


def limits_section(summary: dict) -> list[str]:
    """What these numbers do not show."""
    out = [
        "",
        "What these numbers do not show:",
        *paper_setting_line(summary),
        tuning_line(summary),
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
        comparisons_section(summary.get("comparisons", []), summary),
        last_stage_section(summary),
        boundaries_section(summary["arms"]),
        provenance_section(summary),
        reading_section(summary),
        limits_section(summary),
    ]
    return "\n".join(line for section in sections for line in section) + "\n"
