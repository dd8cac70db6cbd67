"""The reproduce file resolved into a plan: presets, overrides, one validated RunConfig per arm and
seed, and which arms share leading stages (trained once, then branched)."""

from __future__ import annotations

import copy
import hashlib
import json
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from heft.config import RunConfig, config_from_dict, config_to_dict, is_eval_interval
from heft.config_loader import Source, apply_override, did_you_mean, read_yaml
from heft.tasks import task_for

TOP_KEYS = (
    "preset",
    "base",
    "seeds",
    "presets",
    "arms",
    "arms_only",
    "output_dir",
    "eval_every",
    "compare",
    "primary",
    "selected_on",
    "paper",
)
PRESET_KEYS = ("base", "seeds", "epochs")
PAPER_KEYS = ("source", "model", "parameters", "task", "task_name", "train_examples", "method", "arms")
"""A `paper:` block: the published numbers the report sets ours beside (see configs/reproduce_boolq.yaml)."""
SELECTION_KEYS = ("split", "arms", "what")
"""A `selected_on:` block: which arms' settings were chosen by looking at results, on which split, and what."""
RESERVED = ("stages", "seed", "output_dir", "eval_every", "eval_zero_shot")
"""RunConfig fields set per arm by reproduce itself, so `base` may not set them."""


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

    prefixes: dict[str, Prefix] = field(default_factory=dict)
    """Arm → the leading stages it shares with another selected arm, trained once per seed."""
    compare: list[tuple[str, str]] = field(default_factory=list)
    """Pairs (arm, baseline) the report compares example by example, beside its default pairs."""
    paper: dict | None = None
    """The `paper:` block: the published setting and numbers, keyed by our arm names (None: no paper)."""
    primary: tuple[str, str] | None = None
    """A comparison declared before the results: judged on its own p, the others with Holm's correction."""
    selected_on: dict | None = None
    """The `selected_on:` block: arms whose settings were picked on `split` (eval or dev), and what."""

    def run_dir(self, arm: str, seed: int) -> Path:
        return self.output_dir / arm / f"seed-{seed}"


@dataclass
class Prefix:
    """Leading stages shared by several arms: trained once per seed in its own run folder, then
    each arm continues from a copy of its final checkpoint."""

    name: str
    stages: int
    configs: dict[int, RunConfig]

    def run_dir(self, seed: int) -> Path:
        return Path(self.configs[seed].output_dir)


def shared_prefixes(configs: dict[str, dict[int, RunConfig]], selected: Sequence[str], out: Path) -> dict[str, Prefix]:
    """For each selected arm, the longest run of leading stages that another selected arm has too.

    Arms share model, data, subsample and seeds by construction, so equal stage configs mean an
    equal prefix. Arms with the same longest prefix share one `Prefix` (one training per seed).
    """
    stages = {
        arm: [json.dumps(config_to_dict(s), sort_keys=True) for s in next(iter(configs[arm].values())).stages]
        for arm in selected
    }

    def common(a: list[str], b: list[str]) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    found: dict[str, Prefix] = {}
    by_key: dict[str, Prefix] = {}
    for arm in selected:
        k = max((common(stages[arm], stages[other]) for other in selected if other != arm), default=0)
        if not k:
            continue
        key = hashlib.sha256("\n".join(stages[arm][:k]).encode()).hexdigest()[:10]
        if key not in by_key:
            first = next(iter(configs[arm].values()))
            name = "+".join(f"{s.method}{s.epochs:g}" for s in first.stages[:k]) + f"-{key}"
            prefix_configs = {}
            for seed, cfg in configs[arm].items():
                prefix_configs[seed] = copy.deepcopy(cfg)
                prefix_configs[seed].stages = prefix_configs[seed].stages[:k]
                prefix_configs[seed].output_dir = str(out / "_prefix" / name / f"seed-{seed}")
            by_key[key] = Prefix(name, k, prefix_configs)
        found[arm] = by_key[key]
        for seed, cfg in configs[arm].items():  # the prefix evaluates zero-shot if one of its arms should
            by_key[key].configs[seed].eval_zero_shot |= cfg.eval_zero_shot
    return found


def _check(ok: bool, value: Any, key: tuple, src: Source, expected: str) -> None:
    if not ok:
        src.fail(f"bad value {reprlib.repr(value)} for '{'.'.join(map(str, key))}'", key, expected)


def _mapping(value: Any, key: tuple, src: Source, allowed: Sequence[str] | None = None) -> dict:
    """`value` as a mapping whose keys are all in `allowed`, or a one-line error with a suggestion."""
    _check(isinstance(value, dict), value, key, src, "a mapping")
    for name in value:
        if allowed is not None and name not in allowed:
            src.unknown_key((*key, name), allowed)
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
    _check(
        isinstance(preset, str) and preset in presets,
        preset,
        ("preset",),
        src,
        "one of " + ", ".join(map(str, presets)),
    )
    chosen = _mapping(presets[preset], ("presets", preset), src, PRESET_KEYS)
    arms = _mapping(data.get("arms"), ("arms",), src)
    _check(bool(arms), arms, ("arms",), src, "at least one arm")
    nominal = {}
    for arm, spec in arms.items():
        stages = _mapping(spec, ("arms", arm), src, ("stages",)).get("stages")
        _check(
            isinstance(stages, list) and bool(stages) and all(isinstance(s, dict) for s in stages),
            stages,
            ("arms", arm, "stages"),
            src,
            "a non-empty list of stage mappings",
        )
        nominal[arm] = [s.get("epochs", 1.0) for s in stages]
        for i, e in enumerate(nominal[arm]):
            _check(type(e) in (int, float) and e > 0, e, ("arms", arm, "stages", i, "epochs"), src, "a number > 0")
    base = _merge(
        _mapping(data.get("base", {}), ("base",), src),
        _mapping(chosen.get("base", {}), ("presets", preset, "base"), src),
    )
    resolved = {
        "base": base,
        "seeds": chosen.get("seeds", data.get("seeds", [1])),
        "arms": copy.deepcopy(arms),
        "arms_only": data.get("arms_only"),
        "output_dir": data.get("output_dir", "runs/reproduce-{preset}"),
        "eval_every": data.get("eval_every", "epoch"),
        "compare": data.get("compare"),
        "paper": data.get("paper"),
        "primary": data.get("primary"),
        "selected_on": data.get("selected_on"),
    }
    for arm, epochs in _mapping(chosen.get("epochs", {}), ("presets", preset, "epochs"), src, list(arms)).items():
        stages = resolved["arms"][arm]["stages"]
        _check(
            isinstance(epochs, list) and len(epochs) == len(stages),
            epochs,
            ("presets", preset, "epochs", arm),
            src,
            f"a list of {len(stages)} epoch count(s), one per stage of arm '{arm}'",
        )
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
    _check(
        isinstance(seeds, list)
        and bool(seeds)
        and all(type(s) is int for s in seeds)
        and len(set(seeds)) == len(seeds),
        seeds,
        ("seeds",),
        src,
        "a non-empty list of distinct integers",
    )
    _check(
        only is None or (isinstance(only, list) and bool(only)),
        only,
        ("arms_only",),
        src,
        "null or a list of arm names",
    )
    for i, arm in enumerate(only or []):
        close = did_you_mean(str(arm), arms)
        _check(arm in arms, arm, ("arms_only", i), src, "one of " + ", ".join(arms) + (f" ({close})" if close else ""))
    selected = [arm for arm in arms if only is None or arm in only]
    eval_every = resolved["eval_every"]
    _check(is_eval_interval(eval_every), eval_every, ("eval_every",), src, "epoch, stage or a number of epochs > 0")
    out = Path(output_dir if output_dir is not None else str(resolved["output_dir"]).replace("{preset}", preset))
    configs: dict[str, dict[int, RunConfig]] = {}
    for arm, spec in arms.items():
        configs[arm] = {}
        for seed in seeds:
            run = {
                **copy.deepcopy(base),
                "stages": spec["stages"],
                "seed": seed,
                "eval_every": eval_every,
                "eval_zero_shot": arm == selected[0],  # once per seed and call: see the module docstring
                "output_dir": str(out / arm / f"seed-{seed}"),
            }
            configs[arm][seed] = config_from_dict(run, source=f"{path} (preset {preset}, arm {arm})")
            task_for(configs[arm][seed])  # a bad task fails here, not when its arm starts training
    compare = resolved["compare"] or []
    _check(
        isinstance(compare, list)
        and all(isinstance(c, list) and len(c) == 2 and all(a in arms for a in c) for c in compare),
        compare,
        ("compare",),
        src,
        "a list of [arm, baseline] pairs of arm names",
    )
    return Plan(
        preset,
        out,
        seeds,
        configs,
        nominal,
        selected,
        shared_prefixes(configs, selected, out),
        [tuple(c) for c in compare],
        _paper(resolved["paper"], src),
        _primary(resolved["primary"], arms, src),
        _selection(resolved["selected_on"], arms, src),
    )


def _primary(value: Any, arms: dict, src: Source) -> tuple[str, str] | None:
    if value is None:
        return None
    ok = isinstance(value, list) and len(value) == 2 and all(a in arms for a in value) and value[0] != value[1]
    _check(ok, value, ("primary",), src, "null or an [arm, baseline] pair of two arm names")
    return (value[0], value[1])


def _selection(value: Any, arms: dict, src: Source) -> dict | None:
    """The `selected_on:` block checked: split eval or dev, a list of arm names, a text saying what."""
    if value is None:
        return None
    selection = _mapping(value, ("selected_on",), src, SELECTION_KEYS)
    split, chosen, what = (selection.get(k) for k in SELECTION_KEYS)
    _check(split in ("eval", "dev"), split, ("selected_on", "split"), src, "eval or dev")
    ok = isinstance(chosen, list) and bool(chosen) and all(a in arms for a in chosen)
    _check(ok, chosen, ("selected_on", "arms"), src, "a non-empty list of arm names")
    _check(isinstance(what, str) and bool(what), what, ("selected_on", "what"), src, "a text saying what was chosen")
    return selection


def _paper(value: Any, src: Source) -> dict | None:
    """The `paper:` block checked: every key present, arms as {epochs, accuracy} numbers."""
    if value is None:
        return None
    paper = _mapping(value, ("paper",), src, PAPER_KEYS)
    for name in PAPER_KEYS:
        _check(name in paper, None, ("paper", name), src, "a value (every key of a paper block is needed)")
    method = _mapping(paper["method"], ("paper", "method"), src, ("arm", "name"))
    _check(set(method) == {"arm", "name"}, method, ("paper", "method"), src, "{arm: <arm name>, name: <label>}")
    for arm, row in _mapping(paper["arms"], ("paper", "arms"), src).items():
        row = _mapping(row, ("paper", "arms", arm), src, ("epochs", "accuracy"))
        for name in ("epochs", "accuracy"):
            _check(type(row.get(name)) in (int, float), row.get(name), ("paper", "arms", arm, name), src, "a number")
    return paper
