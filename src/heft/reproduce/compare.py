"""The paired comparisons of a summary: which arms, over which unit, on what provenance, decided how.

Each comparison pairs two arms seed by seed on the examples both scored. What makes the pairing
sound is checked from the runs, not the plan: the evaluation sets must be equal (their recorded
hashes), and pairs whose runs trained on different devices or code, or on prefixes that differ
although the plan shares them, are flagged. One rule decides every verdict (`heft.stats.decide`).
"""

from __future__ import annotations

from collections.abc import Sequence

from heft.stats import decide, paired_comparison

NOT_RECORDED = "not recorded"


class EvalSetMismatch(ValueError):
    """Two runs to be paired evaluated different example sets (or another order)."""


def device_label(device: dict | None) -> str:
    if not device:
        return NOT_RECORDED  # runs from before results.json named their device
    return f"{device['type']} ({device['name']})" if device.get("name") else device["type"]


def run_devices(run: dict) -> set[str]:
    """Where a run's stages trained: its own device and, when branched, its prefix's."""
    branch = run.get("branched_from") or {}
    return {device_label(run.get("device"))} | ({device_label(branch.get("device"))} if branch else set())


def device_kind(device: dict | None) -> str:
    """What makes two devices compute differently: the kind, and the GPU's model. CPUs count as one
    kind: older runs name only the architecture ('x86_64'), not the CPU model."""
    if not device:
        return NOT_RECORDED
    return f"{device['type']} ({device['name']})" if device["type"] != "cpu" and device.get("name") else device["type"]


def run_device_kinds(run: dict) -> set[str]:
    branch = run.get("branched_from") or {}
    return {device_kind(run.get("device"))} | ({device_kind(branch.get("device"))} if branch else set())


def run_commits(run: dict) -> set[str]:
    branch = run.get("branched_from") or {}
    return {run.get("commit") or NOT_RECORDED} | ({branch.get("commit") or NOT_RECORDED} if branch else set())


def _whole_split_each_seed(data: dict) -> bool:
    """Without recorded ids: every seed evaluates the same questions when the run took the whole
    evaluation split (no subsample) and that split is not carved out of training per seed."""
    return data.get("max_eval_examples") is None and "held out" not in str(data.get("eval_split", ""))


def example_ids(summary: dict, a: str, b: str, seeds: Sequence[str]) -> tuple[list | None, str]:
    """Per seed, the ids of the examples `a` and `b` both scored (None: each seed its own examples),
    and how that is known. Recorded eval-set hashes must agree, else EvalSetMismatch."""
    runs = [(summary["arms"][a]["seeds"][s], summary["arms"][b]["seeds"][s]) for s in seeds]
    hashes = [(x.get("eval_set_hash"), y.get("eval_set_hash")) for x, y in runs]
    for seed, (x, y), (hx, hy) in zip(seeds, runs, hashes):
        if hx and hy and hx != hy:
            raise EvalSetMismatch(
                f"{x['run_dir']} and {y['run_dir']} (seed {seed}) evaluated different example sets "
                f"(eval_set_hash {hx[:12]}… vs {hy[:12]}…); a paired comparison needs the same examples in order"
            )
    if all(hx for hx, _ in hashes) and all(hx in summary.get("eval_sets", {}) for hx, _ in hashes):
        return [summary["eval_sets"][hx] for hx, _ in hashes], "example ids recorded by the runs"
    if _whole_split_each_seed(summary["data"]):
        size = len(runs[0][0]["final_correct"])
        return [list(range(size))] * len(seeds), "by config: every seed evaluates the whole split (no ids recorded)"
    return (
        None,
        "by config: each seed draws its own subsample (no ids recorded; an example two seeds drew counts twice)",
    )


def pair_provenance(summary: dict, a: str, b: str, seeds: Sequence[str]) -> dict:
    """Seeds on which the two arms' runs trained on different kinds of device (`device_kind`) or
    commits (both recorded), and on which either was not recorded."""
    flags: dict[str, list[int]] = {}
    for name, of in (("device", run_device_kinds), ("commit", run_commits)):
        labels = [of(summary["arms"][a]["seeds"][s]) | of(summary["arms"][b]["seeds"][s]) for s in seeds]
        flags[f"cross_{name}_seeds"] = [int(s) for s, x in zip(seeds, labels) if NOT_RECORDED not in x and len(x) > 1]
        flags[f"{name}_not_recorded_seeds"] = [int(s) for s, x in zip(seeds, labels) if NOT_RECORDED in x]
    return flags


def compare_arms(summary: dict, a: str, b: str) -> dict | None:
    """Paired comparison of the final evaluations of `a` and `b` over the seeds both finished."""
    arms = summary["arms"]
    if a not in arms or b not in arms:
        return None
    seeds = [s for s in arms[a]["seeds"] if s in arms[b]["seeds"]]
    correct = [(arms[a]["seeds"][s].get("final_correct"), arms[b]["seeds"][s].get("final_correct")) for s in seeds]
    if not seeds or any(x is None or y is None for x, y in correct):
        return None  # runs from before per-example results were recorded
    ids, pairing = example_ids(summary, a, b, seeds)
    return {
        "a": a,
        "b": b,
        "key": [a, b],
        "seed_list": [int(s) for s in seeds],
        **paired_comparison([x for x, _ in correct], [y for _, y in correct], ids).to_dict(),
        "pairing": pairing,
        **pair_provenance(summary, a, b, seeds),
        "prefix": prefix_status(summary, a, b),
    }


def _received_by(arms: dict, arm: str) -> str | None:
    """The arm whose final model is, in every seed, the one `arm`'s last stage received (a shared
    prefix that is itself an arm): that gain is the same hypothesis as `arm` − it."""
    runs = arms[arm]["seeds"]
    for other, spec in arms.items():
        if other != arm and all(
            spec["seeds"].get(s, {}).get("final_correct") == r["received_correct"] for s, r in runs.items()
        ):
            return other
    return None


def last_stage_gain(summary: dict, arm: str) -> dict | None:
    """Paired comparison of `arm`'s final evaluation with that of the model its last stage received:
    does the refinement stage improve on what the stages before it learned?"""
    arms = summary["arms"]
    runs = arms[arm]["seeds"]
    if not runs or any(r.get("received_correct") is None or r.get("final_correct") is None for r in runs.values()):
        return None
    seeds = list(runs)
    ids, pairing = example_ids(summary, arm, arm, seeds)
    same_as = _received_by(arms, arm)
    return {
        "a": arm,
        "b": f"its {arms[arm]['methods'][-2]} stage",
        "key": [arm, same_as or "received"],
        "same_as": same_as,
        "seed_list": [int(s) for s in runs],
        **paired_comparison(
            [r["final_correct"] for r in runs.values()], [r["received_correct"] for r in runs.values()], ids
        ).to_dict(),
        "pairing": pairing,
        **pair_provenance(summary, arm, arm, seeds),
        "prefix": None,
    }


def _prefix_records(run: dict, stages: int) -> list:
    """What a run recorded of its first `stages` stages: each boundary's losses and accuracies."""
    keys = ("loss_at_start", "loss_at_end", "accuracy_at_start", "accuracy")
    return [[b.get(k) for k in keys] for b in (run.get("boundaries") or [])[:stages]]


def prefix_status(summary: dict, a: str, b: str) -> dict | None:
    """For two arms the plan branched off one prefix: per seed, whether their runs really started
    from the same checkpoint (recorded hashes), or else whether their records of the shared stages
    agree. None when the plan shares no prefix between them."""
    arms = summary["arms"]
    planned = [(arms[x].get("branched_from") or {}).get("planned") for x in (a, b)]
    if planned[0] is None or planned[0] != planned[1]:
        return None
    stages = arms[a]["branched_from"]["stages"]
    status = {}
    for seed in (s for s in arms[a]["seeds"] if s in arms[b]["seeds"]):
        x, y = arms[a]["seeds"][seed], arms[b]["seeds"][seed]
        cx, cy = ((r.get("branched_from") or {}).get("checkpoint") for r in (x, y))
        if cx and cy:
            status[seed] = "same checkpoint" if cx == cy else "different checkpoints"
        elif _prefix_records(x, stages) and _prefix_records(x, stages) == _prefix_records(y, stages):
            status[seed] = "records agree"
        else:
            status[seed] = "records differ"
    return {"planned": planned[0], "seeds": status}


def decide_all(comparisons: list[dict], gains: list[dict], primary: Sequence[str] | None) -> dict:
    """One decision rule over every comparison the report lists (see `heft.stats.decide`); returns
    what the report states about it."""
    decide(comparisons + gains, tuple(primary) if primary else None)
    family = {tuple(c["key"]) for c in comparisons + gains if not primary or tuple(c["key"]) != tuple(primary)}
    return {"family": len(family), "primary": list(primary) if primary else None}
