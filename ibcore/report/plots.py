"""PNG plots of a run directory (needs the ``plots`` extra, matplotlib); without it they are skipped and the
run says once which extra adds them (:data:`PLOTS_HINT`).

The plots read the metrics of the built-in evaluators when they are there (``per_class_acc``,
``many_acc``/``medium_acc``/``few_acc``); epochs on the x axis count completed epochs, as everywhere.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ibcore.files import atomic_writer

PLOTS_HINT = (
    "plots skipped: matplotlib is not installed; "
    '`pip install -e ".[plots]"` in a clone (or `pip install "ibcore[plots]"`) adds them, '
    "then `ib report RUN_DIR` draws them"
)


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plots(
    run_dir: Path, metrics: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]], class_counts: Sequence[int]
) -> list[Path]:
    """Loss curves, per-class accuracy against class size, and many/medium/few bars. Returns the files."""
    if not matplotlib_available():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    curves: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for line in metrics:
        if line.get("split") == "train" and isinstance(line.get("train_loss"), (int, float)):
            curves[line["run"]].append((line["epoch"], line["train_loss"]))
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for run, points in curves.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], label=run)
        ax.set_xlabel("epochs completed")
        ax.set_ylabel("training loss")
        ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(run_dir / "loss_curves.png")
        _save(fig, written[-1])
        plt.close(fig)
    per_class = {r["run"]: r["per_class_acc"] for r in rows if isinstance(r.get("per_class_acc"), list)}
    if per_class and class_counts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for run, accuracies in per_class.items():
            pairs = [(n, a) for n, a in zip(class_counts, accuracies, strict=False) if a is not None]
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], marker="o", linestyle="", label=run, alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("training images of the class")
        ax.set_ylabel("test accuracy of the class (%)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(run_dir / "per_class_accuracy.png")
        _save(fig, written[-1])
        plt.close(fig)
    groups = ["many_acc", "medium_acc", "few_acc"]
    shot_rows = [r for r in rows if any(isinstance(r.get(g), (int, float)) for g in groups)]
    if shot_rows:
        fig, ax = plt.subplots(figsize=(max(6, len(shot_rows) * 1.2), 4))
        width = 0.8 / len(groups)
        for k, group in enumerate(groups):
            values = [r.get(group) or 0.0 for r in shot_rows]
            positions = [i + k * width for i in range(len(shot_rows))]
            ax.bar(positions, values, width=width, label=group.removesuffix("_acc"))
        ax.set_xticks([i + width for i in range(len(shot_rows))])
        ax.set_xticklabels([r["run"] for r in shot_rows], rotation=30, ha="right", fontsize="small")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(run_dir / "shot_accuracy.png")
        _save(fig, written[-1])
        plt.close(fig)
    return written


def _save(figure: Any, path: Path) -> None:
    """Write a PNG atomically: a full disk leaves no partial or 0-byte plot, and the error names the file."""
    with atomic_writer(path) as handle:
        figure.savefig(handle, format="png", dpi=120)
