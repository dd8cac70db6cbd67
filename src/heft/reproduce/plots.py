"""Accuracy curves of every arm, against epochs and against training tokens."""

from __future__ import annotations

import io
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from heft.files import atomic_write_bytes


def plot(summary: dict, folder: Path) -> None:
    """Accuracy against cumulative epochs and against training tokens, one line per arm (seed mean)."""
    data, zero, majority = summary["data"], summary["zero_shot_accuracy"], summary["majority_accuracy"]
    title = (
        f"{summary['task']}, {summary['preset']} preset: {summary['model']}, "
        f"N={data.get('train_examples', '?')} train / "
        f"{data.get('eval_examples', '?')} eval, seeds {summary['seeds']}"
    )
    for x_key, label, name in (
        ("epoch", "epochs (cumulative over stages)", "accuracy_vs_epoch.png"),
        ("train_tokens", "training tokens forwarded (cumulative)", "accuracy_vs_tokens.png"),
    ):
        fig = Figure(figsize=(8, 5), layout="constrained")
        ax = fig.add_subplot()
        n = len(summary["arms"])
        for i, (arm, a) in enumerate(summary["arms"].items()):
            width = 1.2 + 2.4 * (n - 1 - i) / max(n - 1, 1)  # later arms thinner: coinciding curves stay visible
            ax.plot(
                [c[x_key] for c in a["curve"]],
                [100 * c["accuracy"]["mean"] for c in a["curve"]],
                linewidth=width,
                marker="s" if len(a["methods"]) > 1 else "o",
                markersize=2 + width,
                alpha=0.85,
                label=arm,
            )
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
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=120)
        atomic_write_bytes(folder / name, png.getvalue())  # a report beside training may replace it
