"""Run logging: a CSV of every logged scalar, TensorBoard when installed, a loss.png curve."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


class RunLogger:
    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.csv"
        self.tb = None
        if not enabled:
            return
        rows = []
        if resume_step and self.path.exists():  # drop what the interrupted run logged past its checkpoint
            with open(self.path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < resume_step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "name", "value"])
            w.writeheader()
            w.writerows(rows)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        except Exception:  # tensorboard not installed: CSV and PNG only
            self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", newline="") as f:
            w = csv.writer(f)
            for k, v in values.items():
                w.writerow([step, k, f"{float(v):.8g}"])
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, float(v), step)

    def read(self) -> dict[str, list[tuple[int, float]]]:
        series = defaultdict(list)
        if self.path.exists():
            with open(self.path) as f:
                for r in csv.DictReader(f):
                    series[r["name"]].append((int(r["step"]), float(r["value"])))
        return series

    def plot(self, out_png: Path | None = None) -> Path | None:
        """Training losses (left axis) and validation metrics (right axis) against steps."""
        if not self.enabled:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        series = self.read()
        if not series:
            return None
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        ax2 = ax.twinx()
        for name, pts in sorted(series.items()):
            steps, vals = zip(*pts)
            if name.startswith("train/") and name != "train/lr":
                ax.plot(steps, vals, label=name, lw=1)
            elif name.startswith("val/") and "mean" in name:
                ax2.plot(steps, vals, "o-", label=name, color="black")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax2.set_ylabel("validation")
        lines = ax.get_legend_handles_labels()
        lines2 = ax2.get_legend_handles_labels()
        ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out_png = out_png or self.path.with_name("loss.png")
        fig.savefig(out_png)
        plt.close(fig)
        if self.tb is not None:
            self.tb.flush()
        return out_png
