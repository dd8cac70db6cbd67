"""One picture of the refinement question across the committed results: does a LoReFT stage improve
the LoRA model it receives, and does LoRA-then-LoReFT beat spending that epoch on LoRA?

Reads the paired comparisons of the committed `summary.json` files (no training) and draws each
difference with its 95 % bootstrap interval, its p and its Holm-adjusted p (the reports' decision rule):
    python tools/plot_refinement.py [--output docs/results/refinement.png]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
IDENTITY, RANDOM = "#1f77b4", "#d62728"

# (panel, summary.json, rows): a row is (label, arm a, arm b or None for "a against its own LoRA stage", colour)
PANELS = [
    (
        "BoolQ ablation: 1,000 held-out train examples (lr 1e-4 was chosen on them)",
        "ablate-refinement-cpu/summary.json",
        [
            ("LoReFT stage, identity start, lr 1e-4 − its LoRA-2", "heft-identity-1e-4", "lora-2", IDENTITY),
            ("LoReFT stage, random init, lr 1e-3 − its LoRA-2", "heft-random-1e-3", "lora-2", RANDOM),
            ("identity LoReFT epoch − one more LoRA epoch", "heft-identity-1e-4", "lora-2+lora-1", IDENTITY),
            ("random LoReFT epoch − one more LoRA epoch", "heft-random-1e-3", "lora-2+lora-1", RANDOM),
        ],
    ),
    (
        "ARC-Easy: full training and test sets",
        "multiple-choice/arc_easy/summary.json",
        [
            ("LoReFT stage, identity start − its LoRA-2", "heft-2+1-identity", None, IDENTITY),
            ("LoReFT stage, random init − its LoRA-2", "heft-2+1", None, RANDOM),
            ("HEFT 2+1, identity start − LoRA-3", "heft-2+1-identity", "lora-3", IDENTITY),
            ("HEFT 2+1, random init (paper) − LoRA-3", "heft-2+1", "lora-3", RANDOM),
        ],
    ),
    (
        "OpenBookQA: full training and test sets",
        "multiple-choice/openbookqa/summary.json",
        [
            ("LoReFT stage, identity start − its LoRA-2", "heft-2+1-identity", None, IDENTITY),
            ("LoReFT stage, random init − its LoRA-2", "heft-2+1", None, RANDOM),
            ("HEFT 2+1, identity start − LoRA-3", "heft-2+1-identity", "lora-3", IDENTITY),
            ("HEFT 2+1, random init (paper) − LoRA-3", "heft-2+1", "lora-3", RANDOM),
        ],
    ),
]


def find(summary: dict, a: str, b: str | None) -> dict:
    """The paired comparison a − b, or a's gain over its own LoRA stage when b is None."""
    if b is None:
        return next(g for g in summary["last_stage_gains"] if g["a"] == a)
    return next(c for c in summary["comparisons"] if (c["a"], c["b"]) == (a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=RESULTS / "refinement.png")
    args = parser.parse_args()
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8, 2.1 * len(PANELS) + 0.6), sharex=True)
    for ax, (title, path, rows) in zip(axes, PANELS):
        summary = json.loads((RESULTS / path).read_text())
        for y, (_label, a, b, colour) in enumerate(reversed(rows)):
            c = find(summary, a, b)
            mid, low, high = (100 * c[k] for k in ("difference", "low", "high"))
            ax.errorbar(mid, y, xerr=[[mid - low], [high - mid]], fmt="o", color=colour, capsize=3)
            ax.annotate(
                f"{mid:+.2f}  (p = {c['p']:.2g}, Holm {c['p_adjusted']:.2g})",
                (high, y),
                xytext=(6, -3),
                textcoords="offset points",
                fontsize=7,
            )
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(rows)), [r[0] for r in reversed(rows)], fontsize=8)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_ylim(-0.6, len(rows) - 0.4)
    axes[-1].set_xlabel("paired difference, points (95 % bootstrap interval); p, Holm-adjusted p")
    axes[-1].set_xlim(right=axes[-1].get_xlim()[1] + 4.5)  # room for the labels
    fig.suptitle(
        "smollm2-135m, 2 seeds each: blue starts the LoReFT stage as the identity, red as the paper does", fontsize=9
    )
    fig.tight_layout()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.output, dpi=130)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
