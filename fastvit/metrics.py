"""A run's metrics: JSON lines in ``<out>/metrics.jsonl`` and the ``curves.png`` drawn from them."""
from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """JSON lines in <out>/metrics.jsonl, written by rank 0. On resume, rows after the resumed step are dropped, and
    the final record of a run resumed at its end (which writes it again); ``elapsed`` is the training time the kept
    rows reached, so that ``time`` goes on counting across restarts."""

    def __init__(self, path: Path, enabled: bool, resume_step: int):
        self.path, self.enabled, self.elapsed = path, enabled, 0.0
        if enabled:
            rows = self.read(path) if path.exists() else []
            rows = [r for r in rows if r.get("step", 0) < resume_step
                    or (r.get("step", 0) == resume_step and "final_top1" not in r)]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            self.elapsed = max((r["time"] for r in rows if "time" in r), default=0.0)

    @staticmethod
    def read(path) -> list:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

    def write(self, row: dict):
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")


def plot_curves(metrics_path, png_path) -> None:
    """Loss, learning rate and held-out top-1 against step, as a PNG (matplotlib, Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog.read(metrics_path)
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_top1" in r]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, data, key, title in ((axes[0], train, "loss", "training loss"), (axes[1], train, "lr", "learning rate"),
                                 (axes[2], evals, "eval_top1", "held-out top-1")):
        ax.plot([r["step"] for r in data], [r[key] for r in data], marker="o" if key == "eval_top1" else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
