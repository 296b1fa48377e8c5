"""The benchmark suite behind ``make bench``: run every ``bench/*.py``, print one table, write ``BENCHMARKS.md``.

Each bench runs in a fresh interpreter, one after the other (the machine's cores are the thing being measured),
as ``python bench/NAME.py --quick --json OUT`` under its own time budget (``BUDGETS``, minutes); the suite as a
whole stops starting benches once ``--limit`` minutes are spent. A bench that fails, times out or is missing gets
a row saying so and the suite goes on. Every figure is the median of several runs with min and max, against a peer
measured in the same run (see each bench's docstring for what each side runs).

GPU figures come from ``bench/gpu.sh`` on a device machine, which writes ``bench/results/gpu.json``; without that
file the GPU rows read "pending: no device in this run". The ``make demo`` figures (too long for the budget) are
read from the newest run under ``runs/demo`` (``--demo-dir``) and from ``make demo-seeds``'s runs under ``runs/demo_seeds``
(``--demo-seeds-dir``: median and mean ± std over the seeds): its test metrics file and the training time its
run.log records, with the file's date; with no such run the report says so. No figure is typed into this file.

Usage: python bench/run_all.py [--only data_pipeline,training_step] [--full] [--out BENCHMARKS.md] [--demo-dir runs/demo]
       python bench/run_all.py --from-results runs/bench   (re-write the report from saved JSON, no runs)
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, fmt, validate, verdict, verdict_text  # noqa: E402

BENCH_DIR = REPO / "bench"
NOT_BENCHES = {"common.py", "run_all.py", "gpu_step.py"}  # gpu_step runs only from bench/gpu.sh on a GPU
# Minutes each bench may take under --quick (the order is the run order; unknown new benches get DEFAULT_BUDGET).
BUDGETS = {
    "import_time": 1.0,
    "data_pipeline": 2.0,
    "tar_reading": 1.0,
    "training_step": 9.0,
    "generation": 3.0,
    "decode_compile": 1.5,
    "caption_scoring": 5.0,
    "strategies": 2.5,
    "ddp_scaling": 2.5,
    "checkpoint_io": 0.5,
    "onnx_image_encoder": 1.5,
    "serving": 3.0,
    "question_packs": 1.0,
}
DEFAULT_BUDGET = 2.0
SUITE_FILE = "suite.json"  # in the results folder: the last whole suite's date, load and wall time (--from-results)
GPU_RESULTS = BENCH_DIR / "results" / "gpu.json"
# What bench/gpu.sh measures; shown as pending until its results file exists.
GPU_PENDING = [
    "BLIP-2 OPT-2.7B LoRA (r=16, OPT q/k/v/out) training step, bf16, batch 16: samples/s, MFU, peak memory vs HF Blip2ForConditionalGeneration + peft",
    "BLIP-2 OPT-2.7B Q-Former-only training step, bf16, batch 16: samples/s, MFU, peak memory vs HF Blip2ForConditionalGeneration",
    "BLIP-2 Flan-T5-XL Q-Former-only training step, bf16, batch 16: samples/s, MFU, peak memory vs HF Blip2ForConditionalGeneration",
    "BLIP-2 OPT-2.7B caption generation (beam 5, 30 new tokens), batch 1 and 16: captions/s vs HF generate",
]
DEMO_DIR = REPO / "runs" / "demo"  # where `make demo` writes (Makefile DEMO_OUT)
DEMO_TARGETS = {"cider": 3.0, "ratio": 3.0}  # test CIDEr-D, and that over the best constant caption
DEMO_SEEDS_DIR = REPO / "runs" / "demo_seeds"  # where `make demo-seeds` writes (Makefile SEEDS_OUT)
DEMO_SEED_TARGETS = {"median": 3.5, "ratio": 3.0}  # issue 17: median test CIDEr-D over the seeds, every seed's ratio
PREAMBLE = """Every ratio is ours against the thing a user would otherwise use, measured in the same run on the same
machine, with the same inputs and settings on both sides; a ratio above 1 means ours is better (faster, or
smaller for times and memory). Each figure is the median of several runs (min-max in brackets). Regenerate
with `make bench` (quick sizes, under 20 minutes on 2 cores); each bench's docstring says exactly what each
side runs, and `python bench/NAME.py --help` how to run it alone at full size."""


def demo_figures(root: Path = DEMO_DIR) -> dict:
    """The newest ``make demo`` run's test CIDEr-D, best constant caption and training time, read from its files
    (``test_epoch*_metrics.json``, run.log's "Training time"); ``{"missing": why}`` when there is none."""
    import re

    root = Path(root)
    runs = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.name) if root.is_dir() else []
    for run in reversed(runs):
        files = sorted(run.glob("test_epoch*_metrics.json"))
        if not files:
            continue
        metrics = json.loads(files[-1].read_text())["metrics"]
        if "CIDEr" not in metrics:
            continue
        out = {"run": str(run.relative_to(REPO) if run.is_relative_to(REPO) else run), "file": files[-1].name,
               "date": dt.date.fromtimestamp(files[-1].stat().st_mtime).isoformat(), "cider": float(metrics["CIDEr"]),
               "baseline": metrics.get("constant_baseline_CIDEr"), "baseline_caption": metrics.get("constant_baseline_caption")}
        log = run / "run.log"
        found = re.findall(r"Training time (\d+):(\d\d):(\d\d)", log.read_text(errors="replace")) if log.is_file() else []
        if found:
            h, m, sec = map(int, found[-1])
            out["train_seconds"] = 3600 * h + 60 * m + sec
        return out
    return {"missing": f"no finished `make demo` run (test metrics) under {root}"}


def demo_with_seeds(args) -> dict:
    """:func:`demo_figures` of ``--demo-dir`` with the seed runs of ``--demo-seeds-dir`` under ``"seeds"``."""
    return {**demo_figures(Path(args.demo_dir)), "seeds": demo_seed_figures(Path(args.demo_seeds_dir))}


def demo_seed_figures(root: Path = DEMO_SEEDS_DIR) -> list[dict]:
    """Each finished ``make demo-seeds`` run's seed, test CIDEr-D and best constant caption, by seed ([] if none)."""
    from lavis_ext.report import find_runs, load_run

    try:
        runs = [load_run(run, "test") for run in find_runs([root], "test")] if Path(root).is_dir() else []
    except FileNotFoundError:
        return []
    out = []
    for run in runs:
        seed = run.flat.get("run.seed")
        if "CIDEr" in run.metrics and seed is not None:
            path = Path(run.path).resolve()
            out.append({"seed": int(seed), "cider": run.metrics["CIDEr"],
                        "run": str(path.relative_to(REPO) if path.is_relative_to(REPO) else path),
                        "baseline": run.metrics.get("constant_baseline_CIDEr"),
                        "date": dt.date.fromtimestamp(Path(run.path).stat().st_mtime).isoformat()})
    return sorted(out, key=lambda r: r["seed"])


def demo_seed_table(seeds: list[dict]) -> tuple[list[list[str]], list[str]]:
    """The over-seeds row (median, mean ± sample std, each seed) and its misses."""
    import statistics

    if not seeds:
        return [], []
    ciders = [s["cider"] for s in seeds]
    median, mean = statistics.median(ciders), statistics.fmean(ciders)
    std = statistics.stdev(ciders) if len(ciders) > 1 else 0.0
    ratios = [s["cider"] / s["baseline"] for s in seeds if s.get("baseline")]
    met_m = median >= DEMO_SEED_TARGETS["median"]
    met_r = len(ratios) == len(seeds) and min(ratios) >= DEMO_SEED_TARGETS["ratio"]
    each = " / ".join(f"{s['cider']:.3f}" for s in seeds)
    seeds_text = "/".join(str(s["seed"]) for s in seeds)
    row = [f"demo quality over seeds {seeds_text} (test CIDEr-D, 1 thread each)",
           f"{each}: median {median:.3f}, mean {mean:.3f} ± {std:.3f}",
           "best constant caption: " + " / ".join(f"{s['baseline']:.3f}" for s in seeds if s.get("baseline")),
           f"{min(ratios):.2f}x at worst" if ratios else "-",
           f"median >= {DEMO_SEED_TARGETS['median']:g}: {'met' if met_m else '**not met**'}; every seed >= "
           f"{DEMO_SEED_TARGETS['ratio']:g}x: {'met' if met_r else '**not met**'}",
           f"`make demo-seeds`, {Path(seeds[0]['run']).parents[1]}, {max(s['date'] for s in seeds)}"]
    missed = [] if met_m else [f"demo quality over seeds: median test CIDEr-D {median:.3f} against {DEMO_SEED_TARGETS['median']:g}."]
    if ratios and not met_r:
        missed.append(f"demo quality over seeds: {min(ratios):.2f}x the best constant caption at worst, against "
                      f"{DEMO_SEED_TARGETS['ratio']:g}x.")
    return [row], missed


def demo_table(demo: dict) -> tuple[list[list[str]], list[str]]:
    """Rows of the demo table and the misses, from :func:`demo_figures`."""
    if "missing" in demo:
        return [], []
    rows, missed = [], []
    where = f"`make demo`, {demo['run']}/{demo['file']}, {demo['date']}"
    target_c, target_r = DEMO_TARGETS["cider"], DEMO_TARGETS["ratio"]
    base = demo.get("baseline")
    ratio = demo["cider"] / base if base else None
    met_c, met_r = demo["cider"] >= target_c, ratio is not None and ratio >= target_r
    rows.append(["demo quality (test CIDEr-D, greedy)", f"{demo['cider']:.2f}",
                 f"best single constant caption: {base:.2f}" if base else "-", f"{ratio:.2f}x" if ratio else "-",
                 f">= {target_c:g}: {'met' if met_c else '**not met**'}; >= {target_r:g}x: "
                 + ("met" if met_r else "**not met**" if ratio else "no baseline recorded"), where])
    if not met_c:
        missed.append(f"demo quality: test CIDEr-D {demo['cider']:.2f} against a target of {target_c:g}.")
    if ratio is not None and not met_r:
        missed.append(f"demo quality: CIDEr-D {ratio:.2f}x the best constant caption against {target_r:g}x.")
    if "train_seconds" in demo:
        m, sec = divmod(demo["train_seconds"], 60)
        rows.append(["`make demo` training time (train.py, from run.log; set-up and data not included)", f"{m} min {sec} s",
                     "-", "-", "none", where])
    return rows, missed


def discover(only: list[str] | None = None) -> list[str]:
    """Bench names to run: the BUDGETS order first, then any other ``bench/*.py`` alphabetically."""
    present = sorted(p.stem for p in BENCH_DIR.glob("*.py") if p.name not in NOT_BENCHES and not p.name.startswith("_"))
    names = [n for n in BUDGETS if n in present] + [n for n in present if n not in BUDGETS]
    if only:
        unknown = [n for n in only if n not in present]
        if unknown:
            raise SystemExit(f"unknown bench(es) {unknown}; present: {', '.join(present)}")
        names = [n for n in names if n in only]
    return names


def run_one(name: str, out_dir: Path, quick: bool, timeout_s: float) -> dict:
    """Run one bench in a fresh interpreter; return its validated payload or a failure record."""
    out = out_dir / f"{name}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-W", "ignore", str(BENCH_DIR / f"{name}.py"), *(["--quick"] if quick else []), "--json", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    env.setdefault("LAVIS_EXT_DATA", str(REPO / "data" / "synthetic"))
    start = time.perf_counter()
    log = out_dir / f"{name}.log"
    with open(log, "w") as log_file:
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=timeout_s,
                                  check=False)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = None
    seconds = time.perf_counter() - start
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-3:]
    if code is None:
        return failure(name, f"timed out after {timeout_s:.0f} s (budget)", seconds)
    if code != 0:
        return failure(name, f"exit code {code}: {' | '.join(tail)[-300:]}", seconds)
    if not out.is_file():
        return failure(name, "wrote no --json output (does it support --quick --json?)", seconds)
    try:
        payload = validate(json.loads(out.read_text()))
    except (ValueError, json.JSONDecodeError) as exn:
        return failure(name, f"bad JSON output: {exn}", seconds)
    payload["seconds"] = seconds
    return payload


def failure(name: str, why: str, seconds: float = 0.0) -> dict:
    return {"bench": name, "command": f"python bench/{name}.py --quick", "rows": [], "error": why, "seconds": seconds}


def machine() -> dict:
    """CPU model and count, memory, GPU (none unless a GPU results file says so), OS and package versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kib = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        memory = f"{mem_kib / 2**20:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        memory = "?"
    versions = {}
    for package in ("torch", "torchvision", "transformers", "salesforce-lavis", "webdataset", "peft", "pillow", "onnxruntime"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory": memory, "os": platform.platform(terse=True),
            "python": platform.python_version(), "versions": versions}


def _stat(s: dict | None, unit: str) -> str:
    if not s:
        return "-"
    return f"{s['label']}: {fmt(s['median'], unit)} ({fmt(s['min'])}-{fmt(s['max'])})"


def ratio_text(r: dict) -> str:
    """Two decimals, or three where two would round a miss up to the target (0.898 -> "0.898x", not "0.90x")."""
    if r.get("ratio") is None:
        return "-"
    text = f"{r['ratio']:.2f}"
    if r.get("met") is False and r.get("verdict") != "within noise" and float(text) >= r["target"]:
        text = f"{r['ratio']:.3f}"
    return text + "x"


def _verdict(r: dict) -> str:
    if r.get("target") is None:
        return "none"
    text = verdict_text(r)
    return f">= {r['target']:g}x: " + {"NOT met": "**not met**"}.get(text, text)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def shown_command(command: str) -> str:
    """The command without its ``--json PATH`` (where this run kept its files is no part of the recipe)."""
    words = command.split()
    for flag in ("--json",):
        if flag in words:
            i = words.index(flag)
            del words[i:i + 2]
    return " ".join(words)


def table_rows(results: list[dict]) -> list[list[str]]:
    """One list of cells per figure (and one per failed or skipped bench)."""
    lines = []
    for res in results:
        if res.get("error"):
            lines.append([res["bench"], "(whole bench)", "-", "-", "-", "-", f"**failed**: {res['error']}", f"`{shown_command(res['command'])}`"])
            continue
        for r in res["rows"]:
            ratio = ratio_text(r)
            lines.append([res["bench"], r["what"], _stat(r["ours"], r["unit"]), _stat(r["peer"], r["unit"]), ratio,
                          _verdict(r), r.get("note", ""), f"`{shown_command(res['command'])}`"])
    return lines


def rejudge(payload: dict | None) -> dict | None:
    """Every row's verdict recomputed from its figures by :func:`common.verdict`, so a results file written by an
    older bench (which called a ratio above its target "met" whatever its ranges) is judged by today's rule."""
    for r in (payload or {}).get("rows", []):
        r["verdict"] = verdict(r["ours"], r["peer"], r["higher_is_better"], r["ratio"], r["target"])
        r["met"] = None if r["verdict"] is None else r["verdict"] == "met"
    return payload


def render_markdown(results: list[dict], info: dict, gpu: dict | None, date: str, load: tuple | None = None,
                    quick: bool = True, seconds: float | None = None, demo: dict | None = None) -> str:
    """The whole BENCHMARKS.md text from bench payloads (see bench/common.py for the row schema) and the demo
    figures (:func:`demo_figures`; None: none looked for)."""
    results, gpu = [rejudge(r) for r in results], rejudge(gpu)
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    out = ["# Benchmarks", "", PREAMBLE, "",
           f"Machine: {info['cpu']}, {info['cores']} CPU cores, {info['memory']}, no GPU; {info['os']}; "
           f"Python {info['python']}, {versions}. Date: {date}."]
    if load is not None:
        out.append(f"Load average (1 min) {load[0]:.1f} at the start and {load[1]:.1f} at the end of the run; figures taken "
                   "under load from other processes are noisy, but both sides of a ratio share it (runs alternate).")
    if seconds is not None:
        out.append(f"Suite wall time: {seconds / 60:.1f} min ({'--quick sizes' if quick else 'full sizes'}).")
    out += ["", "## CPU figures (`make bench`)", "",
            "| bench | what | ours median (min-max) | peer median (min-max) | ratio | target | note | command |",
            "|---|---|---|---|---|---|---|---|"]
    out += ["| " + " | ".join(_cell(c) for c in cells) + " |" for cells in table_rows(results)]
    out += ["", "## GPU figures (`bench/gpu.sh`)", ""]
    if gpu is None:
        out.append("Pending: no device in this run. `bench/gpu.sh` (random-init real-size models, bf16, batch 16) "
                   "writes `bench/results/gpu.json` on a CUDA machine; the next `make bench` then shows its rows here.")
        out += ["", "| what | status |", "|---|---|"] + [f"| {_cell(w)} | pending: no device in this run |" for w in GPU_PENDING]
    else:
        where = gpu.get("machine", {})
        out.append(f"Measured by `{gpu.get('command', 'bench/gpu.sh')}` on {where.get('gpu', '?')} "
                   f"({where.get('date', '?')}; torch {where.get('torch', '?')}).")
        out += ["", "| what | ours median (min-max) | peer median (min-max) | ratio | target | note |", "|---|---|---|---|---|---|"]
        for cells in table_rows([gpu]):
            out.append("| " + " | ".join(_cell(c) for c in [cells[1], *cells[2:7]]) + " |")
    demo = demo or {"missing": "no `make demo` run was looked for"}
    demo_rows, demo_missed = demo_table(demo)
    seed_rows, seed_missed = demo_seed_table(demo.get("seeds") or [])
    demo_rows, demo_missed = demo_rows + seed_rows, demo_missed + seed_missed
    out += ["", "## `make demo` (read from its run folder)", ""]
    if demo_rows:
        out += ["Read from the run's own files by `python bench/run_all.py`; re-run `make demo` to refresh them. The wall "
                "time of `make demo` as a whole (set-up, data, training, evaluation) is not recorded by any file: "
                "measure it with `time make demo`.", "",
                "| what | ours | peer | ratio | target | source |", "|---|---|---|---|---|---|"]
        out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in demo_rows]
    else:
        out.append(f"No figures: {demo['missing']}. Run `make demo`, then `make bench` (or `python bench/run_all.py --from-results runs/bench`).")
    missed = [(res["bench"], r) for res in results for r in res.get("rows", []) if r.get("met") is False]
    noisy = [(bench, r) for bench, r in missed if r.get("verdict") == "within noise"]
    missed = [(bench, r) for bench, r in missed if r.get("verdict") != "within noise"]
    failed = [res for res in results if res.get("error")]
    out += ["", "## Targets missed and why", ""]
    if not missed and not failed and not noisy and not demo_missed:
        out.append("None in this run.")
    for bench, r in missed:
        out.append(f"- {bench}, {r['what']}: {ratio_text(r)} against a target of {r['target']:g}x. {r.get('note') or 'No reason recorded.'}")
    for bench, r in noisy:
        out.append(f"- {bench}, {r['what']}: median {ratio_text(r)} against a target of {r['target']:g}x, within noise "
                   f"(the min-max ranges overlap, so this run does not show the target reached). {r.get('note') or ''}".rstrip())
    for res in failed:
        out.append(f"- {res['bench']}: no figures, {res['error']}.")
    out += [f"- {line}" for line in demo_missed]
    return "\n".join(out) + "\n"


def print_table(results: list[dict]) -> None:
    for cells in table_rows(results):
        bench, what, ours, peer, ratio, verdict, note, _ = cells
        print(f"{bench:<18} {what[:60]:<60} {ratio:>7}  {verdict}")
        print(f"{'':<18}   ours {ours}\n{'':<18}   peer {peer}" + (f"\n{'':<18}   {note[:200]}" if note else ""))


def load_gpu(path: Path = GPU_RESULTS) -> dict | None:
    """The GPU script's results when present and well-formed (a broken file is reported, not hidden)."""
    if not path.is_file():
        return None
    try:
        return validate(json.loads(path.read_text()))
    except (ValueError, json.JSONDecodeError) as exn:
        return failure("gpu", f"{path} is not a valid results file: {exn}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=None, help="comma-separated bench names (default: all of bench/*.py)")
    parser.add_argument("--full", action="store_true", help="full sizes instead of --quick (takes far longer)")
    parser.add_argument("--limit", type=float, default=19.0, help="minutes for the benches (default 19: make data and set-up fit in 20)")
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"), help="the report to write")
    parser.add_argument("--results-dir", default=str(REPO / "runs" / "bench"), help="where each bench's JSON and log go")
    parser.add_argument("--from-results", metavar="DIR", default=None, help="write the report from saved JSON; run nothing")
    parser.add_argument("--demo-dir", default=str(DEMO_DIR), help="where `make demo` wrote its runs (the demo figures are read there)")
    parser.add_argument("--demo-seeds-dir", default=str(DEMO_SEEDS_DIR),
                        help="where `make demo-seeds` wrote its seed runs (the over-seeds row is read there)")
    args = parser.parse_args(argv)
    info = machine()
    date = dt.date.today().isoformat()
    if args.from_results:
        folder = Path(args.from_results)
        results = [validate(json.loads((folder / f"{n}.json").read_text())) if (folder / f"{n}.json").is_file()
                   else failure(n, "no saved result") for n in discover()]
        suite = json.loads((folder / SUITE_FILE).read_text()) if (folder / SUITE_FILE).is_file() else {}
        Path(args.out).write_text(render_markdown(
            results, info, load_gpu(), suite.get("date", date), load=suite.get("load"), quick=suite.get("quick", True),
            seconds=suite.get("seconds"), demo=demo_with_seeds(args)))
        print(f"wrote {args.out} from {folder}")
        return 0
    names = discover(args.only.split(",") if args.only else None)
    out_dir = Path(args.results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    suite_start = time.perf_counter()
    results = []
    for name in names:
        budget_s = BUDGETS.get(name, DEFAULT_BUDGET) * 60 * (1 if not args.full else 10)
        left_s = args.limit * 60 - (time.perf_counter() - suite_start)
        if left_s < 20:
            results.append(failure(name, f"not run: the suite's {args.limit:g}-minute limit was spent", 0.0))
            continue
        print(f"== {name} (budget {budget_s / 60:.1f} min)", flush=True)
        # the budget is what a bench aims at on a quiet machine; it is killed at 1.5x (load on a shared machine)
        res = run_one(name, out_dir, quick=not args.full, timeout_s=min(1.5 * budget_s, left_s))
        print(f"   {'failed: ' + res['error'] if res.get('error') else 'done'} in {res['seconds']:.0f} s", flush=True)
        results.append(res)
    seconds = time.perf_counter() - suite_start
    load = (load_start, os.getloadavg()[0])
    print()
    print_table(results)
    if args.only is None:  # the whole suite's figures, for a later --from-results
        (out_dir / SUITE_FILE).write_text(json.dumps({"date": date, "load": load, "quick": not args.full,
                                                      "seconds": seconds}))
    text = render_markdown(results, info, load_gpu(), date, load=load, quick=not args.full, seconds=seconds,
                           demo=demo_with_seeds(args))
    Path(args.out).write_text(text)
    print(f"\nwrote {args.out} ({seconds / 60:.1f} min); per-bench JSON and logs in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
