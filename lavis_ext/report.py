"""``lavis-ext report RUN_DIR...``: several runs' metrics as one mean ± std table (Markdown and CSV), and their
curves on one plot.

A number from one seed says little on 2 CPU cores or 16 GPUs alike: kernels, data order and initialisation
move it. Sweeps are launched with the tools that exist (a shell loop or a SLURM array over ``run.seed``, see
docs/experiments.md); this module only reads what the runs wrote:

- ``<split>_epoch<e>_metrics.json`` (``best`` if there, else the highest epoch) for the numbers;
- the config LAVIS logs as the first JSON object of ``log.txt``, to group runs: runs whose configs are equal
  except for the seed and the paths/ids of the run form one group (one row: mean ± sample std over its
  runs), so an ablation folder with 3 seeds x 3 settings gives 3 rows without naming anything;
- ``tensorboard/`` event files for the curves (``train/loss`` and every validation metric, one colour per
  group, one line per run).

Why not TensorBoard's own comparison: it shows curves, not a table with spreads, and needs a server.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["Run", "find_runs", "group_runs", "load_run", "main", "markdown_table", "csv_table", "plot_curves"]

#: config keys that differ between the runs of one sweep without making them different experiments.
IGNORED_KEYS = ("run.seed", "run.output_dir", "run.job_id", "run.resume_ckpt_path", "run.resume", "run.rank",
                "run.gpu", "run.dist_url", "run.world_size", "run.distributed", "run.dist_backend")
DEFAULT_METRICS = ("CIDEr", "Bleu_4", "METEOR", "ROUGE_L", "overall", "agg_metrics", "loss")


@dataclass
class Run:
    path: Path
    config: dict
    metrics: dict
    epoch: str
    group: str = ""
    flat: dict = field(default_factory=dict)

    @property
    def seed(self):
        return self.flat.get("run.seed")


def _flatten(node, prefix="") -> dict:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _logged_config(run_dir: Path) -> dict:
    log = run_dir / "log.txt"
    if not log.is_file():
        return {}
    text = log.read_text(errors="replace").lstrip()
    try:
        config, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return {}
    return config if isinstance(config, dict) else {}


def _metrics_file(run_dir: Path, split: str) -> Path | None:
    files = list(run_dir.glob(f"{split}_epoch*_metrics.json"))
    if not files:
        return None
    best = [f for f in files if f.name == f"{split}_epochbest_metrics.json"]
    if best:
        return best[0]

    def epoch(path: Path) -> float:
        tag = path.name[len(f"{split}_epoch"): -len("_metrics.json")]
        return float(tag) if tag.isdigit() else -1.0

    return max(files, key=epoch)


def find_runs(paths: Sequence[str | Path], split: str) -> list[Path]:
    """Run directories under ``paths``: a path that holds ``<split>_epoch*_metrics.json`` is a run; otherwise
    every folder below it that holds one is (a sweep's output root, or ``runs/demo`` with its job folders).

    Raises:
        FileNotFoundError: a path that does not exist, or no run with ``split`` metrics under any path.
    """
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"{str(path)!r} does not exist; give run directories or folders holding them")
        if _metrics_file(path, split) is not None:
            found.append(path)
            continue
        found.extend(sorted({f.parent for f in path.rglob(f"{split}_epoch*_metrics.json")}))
    if not found:
        raise FileNotFoundError(
            f"no {split!r} metrics (<run>/{split}_epoch*_metrics.json) under {[str(p) for p in paths]}; "
            "did the runs finish their test phase? (--split val reads validation metrics)"
        )
    return list(dict.fromkeys(found))


def load_run(run_dir: Path, split: str) -> Run:
    path = _metrics_file(run_dir, split)
    record = json.loads(path.read_text())
    # nested figures (VQA's per_answer_type / per_question_type) as dotted names: per_answer_type.yes/no
    metrics = {k: v for k, v in _flatten(record.get("metrics", {})).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    config = _logged_config(run_dir)
    epoch = path.name[len(f"{split}_epoch"): -len("_metrics.json")]
    return Run(path=run_dir, config=config, metrics=metrics, epoch=epoch, flat=_flatten(config))


def group_runs(runs: list[Run], ignore: Sequence[str] = ()) -> dict[str, list[Run]]:
    """Group runs whose configs differ only in :data:`IGNORED_KEYS` and ``ignore`` (e.g. ``model.pretrained`` when
    each seed starts from its own checkpoint); each group is named by the config values that set it apart from
    the other groups (``"all runs"`` when there is one group)."""
    ignored = set(IGNORED_KEYS) | set(ignore)

    def key(run: Run) -> str:
        kept = {k: v for k, v in run.flat.items() if k not in ignored}
        return json.dumps(kept, sort_keys=True, default=str)

    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(key(run), []).append(run)
    if len(groups) == 1:
        only = next(iter(groups.values()))
        for run in only:
            run.group = "all runs"
        return {"all runs": only}
    configs = {k: json.loads(k) for k in groups}
    differing = sorted({k for c in configs.values() for k in c if len({json.dumps(d.get(k), default=str) for d in configs.values()}) > 1})
    named: dict[str, list[Run]] = {}
    for raw, members in groups.items():
        label = ", ".join(f"{k}={configs[raw].get(k)}" for k in differing) or raw
        for run in members:
            run.group = label
        named[label] = members
    return named


def _spread(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return mean, std


def _metric_names(runs: list[Run], wanted: Sequence[str] | None) -> list[str]:
    present = [m for m in dict.fromkeys(k for r in runs for k in r.metrics)]
    if wanted:
        missing = [m for m in wanted if m not in present]
        if missing:
            raise KeyError(f"metric(s) {missing} are in none of the runs; they have {present}")
        return list(wanted)
    chosen = [m for m in DEFAULT_METRICS if m in present]
    return chosen or present


def _rows(groups: dict[str, list[Run]], metrics: list[str]) -> list[dict]:
    rows = []
    for label, members in groups.items():
        row = {"group": label, "runs": len(members), "seeds": ",".join(str(r.seed) for r in members)}
        for m in metrics:
            values = [r.metrics[m] for r in members if m in r.metrics]
            row[m] = _spread(values) if values else (math.nan, math.nan)
        rows.append(row)
    return rows


def markdown_table(groups: dict[str, list[Run]], metrics: list[str], split: str, per_run: bool = True) -> str:
    """Mean ± sample std per group (std is "n/a" for one run), then every run's own numbers."""
    def fmt(mean, std):
        return f"{mean:.4g} ± {std:.2g}" if not math.isnan(std) else f"{mean:.4g} (n/a: 1 run)"

    lines = [f"| group ({split}) | runs | seeds | " + " | ".join(metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for row in _rows(groups, metrics):
        lines.append(f"| {row['group']} | {row['runs']} | {row['seeds']} | " + " | ".join(fmt(*row[m]) for m in metrics) + " |")
    if per_run:
        lines += ["", "| run | group | seed | epoch | " + " | ".join(metrics) + " |", "|---|---|---|---|" + "---|" * len(metrics)]
        for label, members in groups.items():
            for r in members:
                values = " | ".join(f"{r.metrics[m]:.4g}" if m in r.metrics else "" for m in metrics)
                lines.append(f"| {r.path} | {label} | {r.seed} | {r.epoch} | {values} |")
    return "\n".join(lines) + "\n"


def csv_table(groups: dict[str, list[Run]], metrics: list[str]) -> str:
    """One row per run, then one mean and one std row per group (column ``kind``)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["kind", "group", "run", "seed", "epoch", *metrics])
    for label, members in groups.items():
        for r in members:
            writer.writerow(["run", label, str(r.path), r.seed, r.epoch, *[r.metrics.get(m, "") for m in metrics]])
    for row in _rows(groups, metrics):
        writer.writerow(["mean", row["group"], "", row["seeds"], "", *[row[m][0] for m in metrics]])
        writer.writerow(["std", row["group"], "", row["seeds"], "", *[row[m][1] for m in metrics]])
    return out.getvalue()


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of a run's ``tensorboard/`` events: ``{tag: [(step, value), ...]}``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return {tag: sorted(points) for tag, points in series.items()}


def plot_curves(groups: dict[str, list[Run]], path: str | Path, tags: Sequence[str] | None = None) -> Path:
    """One subplot per tag (default ``train/loss`` and the validation metrics), a colour per group, a line
    per run. Raises FileNotFoundError when no run has TensorBoard scalars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scalars = {r.path: read_scalars(r.path) for members in groups.values() for r in members}
    available = sorted({t for s in scalars.values() for t in s})
    if not available:
        raise FileNotFoundError("none of the runs has TensorBoard scalars (<run>/tensorboard/events.out.tfevents.*)")
    if tags:
        missing = [t for t in tags if t not in available]
        if missing:
            raise KeyError(f"curve(s) {missing} are in none of the runs; they have {available}")
        chosen = list(tags)
    else:
        chosen = [t for t in available if t == "train/loss" or (t.startswith("val") and not t.endswith("_caption"))][:6]
        chosen = chosen or available[:6]
    cols = min(3, len(chosen))
    rows = (len(chosen) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 3.4 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, tag in zip(axes.flat, chosen):
        for g, (label, members) in enumerate(groups.items()):
            for i, run in enumerate(members):
                points = scalars[run.path].get(tag)
                if points:
                    steps, values = zip(*points)
                    ax.plot(steps, values, color=colours[g % len(colours)], alpha=0.8, linewidth=1.2,
                            label=label if i == 0 else None)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(chosen):]:
        ax.axis("off")
    if len(groups) > 1 or next(iter(groups)) != "all runs":
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="lavis-ext report",
        description="Aggregate several runs (e.g. seeds of a sweep) into a mean ± std table and a plot of their curves.",
    )
    parser.add_argument("runs", nargs="+", help="run directories, or folders holding them (searched recursively)")
    parser.add_argument("--split", default="test", help="which split's metrics (default test)")
    parser.add_argument("--metrics", nargs="+", default=None, help=f"metrics to show (default: those of {DEFAULT_METRICS} present)")
    parser.add_argument("--markdown", default=None, help="write the Markdown table here (it is printed either way)")
    parser.add_argument("--csv", default=None, help="write the CSV (per run, then mean/std per group) here")
    parser.add_argument("--plot", default=None, help="write the curves PNG here")
    parser.add_argument("--curves", nargs="+", default=None, help="TensorBoard tags to plot (default train/loss + val metrics)")
    parser.add_argument("--ignore", nargs="+", default=(), metavar="KEY",
                        help="config keys that do not split groups, besides the seed and paths (e.g. model.pretrained)")
    args = parser.parse_args(argv)
    runs = [load_run(p, args.split) for p in find_runs(args.runs, args.split)]
    groups = group_runs(runs, args.ignore)
    metrics = _metric_names(runs, args.metrics)
    table = markdown_table(groups, metrics, args.split)
    print(table, end="")
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.csv:
        Path(args.csv).write_text(csv_table(groups, metrics))
    if args.plot:
        print(f"curves: {plot_curves(groups, args.plot, args.curves)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
