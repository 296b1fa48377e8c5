"""Run tracking on the main process: TensorBoard scalars plus an in-memory history for a PNG plot.

LAVIS logs only to `log.txt`; curves are what a researcher looks at first. Other ranks get a
tracker that records nothing.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

logger = logging.getLogger(__name__)


class RunTracker:
    def __init__(self, output_dir: str | Path, enabled: bool = True):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self._writer = None

    def _tb(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"))
        return self._writer

    def scalar(self, name: str, value, step: int) -> None:
        if not self.enabled:
            return
        try:
            value = float(value)
        except (TypeError, ValueError):
            return  # non-numeric entries (e.g. a caption string) are not curves
        self.history[name].append((int(step), value))
        self._tb().add_scalar(name, value, int(step))

    def scalars(self, prefix: str, values: dict, step: int) -> None:
        for key, value in values.items():
            self.scalar(f"{prefix}/{key}", value, step)

    def plot(self, path: str | Path | None = None) -> Path | None:
        """Write one subplot per series (loss, lr, each metric) to a PNG; returns its path."""
        if not self.enabled or not self.history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path or self.output_dir / "curves.png")
        names = sorted(self.history)
        cols = min(3, len(names))
        rows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            steps, values = zip(*self.history[name])
            ax.plot(steps, values, marker="o" if len(steps) < 20 else None, markersize=3)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        logger.info("curves written to %s", path)
        return path

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
