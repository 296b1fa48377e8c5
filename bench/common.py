"""What every bench script shares: the ``--quick/--runs/--json`` arguments, timing, statistics and the JSON row schema.

Each bench measures ours against a peer in the same process (or the same invocation), the two sides alternating
run by run (:func:`alternate`, :func:`interleaved`), and reports rows of
``{"what", "unit", "higher_is_better", "ours": stat, "peer": stat | None, "ratio", "target", "met", "verdict", "note"}``
where ``stat = {"label", "median", "min", "max"}`` and ``ratio`` > 1 always means ours is better. ``verdict`` is
"met" only when the min-max ranges separate (:func:`verdict`), "not met", or "within noise"; ``met`` is True only
for "met".
``bench/run_all.py`` collects these files into ``BENCHMARKS.md``; :func:`validate` is the schema both sides trust.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
ROW_KEYS = ("what", "unit", "higher_is_better", "ours", "peer", "ratio", "target", "met", "note")
STAT_KEYS = ("label", "median", "min", "max")


def add_common_args(parser: argparse.ArgumentParser, runs: int = 5, quick_runs: int = 3) -> argparse.ArgumentParser:
    """``--quick`` (the make-bench budget), ``--runs N`` and ``--json OUT``; ``runs`` defaults depend on quick."""
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer runs (the `make bench` budget)")
    parser.add_argument("--runs", type=int, default=None, help=f"timed repetitions (default {runs}, {quick_runs} with --quick)")
    parser.add_argument("--json", metavar="OUT", default=None, help="write the rows as JSON (schema: bench/common.py)")
    parser.set_defaults(_runs_default=(runs, quick_runs))
    return parser


def resolve_runs(args) -> int:
    """The number of timed runs: ``--runs`` when given, else the quick or full default; at least 1."""
    if args.runs is not None:
        if args.runs < 1:
            raise SystemExit(f"--runs {args.runs}: give at least 1")
        return args.runs
    full, quick = args._runs_default
    return quick if args.quick else full


def stat(label: str, values: Iterable[float]) -> dict:
    """Median, min and max of ``values`` under ``label``."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError(f"{label}: no measurements")
    return {"label": label, "median": statistics.median(values), "min": min(values), "max": max(values)}


def ratio_of(ours: dict, peer: dict | None, higher_is_better: bool) -> float | None:
    """ours/peer for throughputs, peer/ours for times: > 1 means ours is better."""
    if peer is None or not peer["median"] or not ours["median"]:
        return None
    return ours["median"] / peer["median"] if higher_is_better else peer["median"] / ours["median"]


def ranges_overlap(ours: dict, peer: dict | None) -> bool:
    """True when the min-max ranges of two stats overlap: a difference of medians this run cannot resolve."""
    return peer is not None and ours["min"] <= peer["max"] and peer["min"] <= ours["max"]


def ratio_bounds(ours: dict, peer: dict, higher_is_better: bool) -> tuple[float, float]:
    """The ratio's worst and best case over the runs: ours' slowest against the peer's fastest run, and the
    reverse. Both above 1 = the ranges separate in ours' favour; both below = in the peer's."""
    if higher_is_better:
        return ours["min"] / peer["max"], ours["max"] / peer["min"]
    return peer["min"] / ours["max"], peer["max"] / ours["min"]


VERDICTS = ("met", "not met", "within noise")


def verdict(ours: dict, peer: dict | None, higher_is_better: bool, ratio: float | None, target: float | None) -> str | None:
    """"met" only when even the worst case over the runs reaches the target (for a target of 1: ours' slowest run
    beats the peer's fastest), "not met" when even the best case misses it, else "within noise": a median ratio
    above the target whose ranges overlap is noise, not a result. A ratio given without a peer (a figure computed
    another way) is judged by its value. None without a target or a ratio."""
    if target is None or ratio is None:
        return None
    if peer is None or not peer["min"] or not ours["min"]:
        return "met" if ratio >= target else "not met"
    worst, best = ratio_bounds(ours, peer, higher_is_better)
    if worst > target or (worst == best and worst >= target):  # a single run per side: no spread to separate
        return "met"
    if best < target:
        return "not met"
    return "within noise"


def row(what: str, unit: str, ours: dict, peer: dict | None = None, *, higher_is_better: bool = True,
        target: float | None = None, note: str = "", ratio: float | None = None) -> dict:
    """One table row; the ratio is computed from the medians unless given; ``verdict`` (see :func:`verdict`) and
    ``met`` (True only for "met": a target reached within noise is not met) from the target."""
    if ratio is None:
        ratio = ratio_of(ours, peer, higher_is_better)
    judged = verdict(ours, peer, higher_is_better, ratio, target)
    met = None if judged is None else judged == "met"
    return {"what": what, "unit": unit, "higher_is_better": bool(higher_is_better), "ours": ours, "peer": peer,
            "ratio": ratio, "target": target, "met": met, "verdict": judged, "note": note}


def validate(payload: dict) -> dict:
    """Raise ValueError naming the first field of ``payload`` that breaks the schema; return it unchanged."""
    if not isinstance(payload, dict):
        raise ValueError(f"bench result is a {type(payload).__name__}, not an object")
    for key in ("bench", "command", "rows"):
        if key not in payload:
            raise ValueError(f"bench result has no {key!r} (keys: {sorted(payload)})")
    if not isinstance(payload["rows"], list):
        raise ValueError("bench result 'rows' is not a list")
    for i, r in enumerate(payload["rows"]):
        where = f"{payload['bench']} row {i}"
        missing = [k for k in ROW_KEYS if k not in r]
        if missing:
            raise ValueError(f"{where}: missing {missing}")
        for side in ("ours", "peer"):
            s = r[side]
            if s is None and side == "peer":
                continue
            if not isinstance(s, dict) or any(k not in s for k in STAT_KEYS):
                raise ValueError(f"{where}: {side!r} must be an object with {list(STAT_KEYS)}, got {s!r}")
            for k in ("median", "min", "max"):
                if not isinstance(s[k], (int, float)):
                    raise ValueError(f"{where}: {side}.{k} is {s[k]!r}, not a number")
        for k in ("ratio", "target"):
            if r[k] is not None and not isinstance(r[k], (int, float)):
                raise ValueError(f"{where}: {k} is {r[k]!r}, not a number or null")
        if r["met"] not in (None, True, False):
            raise ValueError(f"{where}: met is {r['met']!r}, not true/false/null")
        if r.get("verdict") not in (None, *VERDICTS):
            raise ValueError(f"{where}: verdict is {r['verdict']!r}, not one of {list(VERDICTS)} or null")
        if r.get("verdict") is not None and r["met"] != (r["verdict"] == "met"):
            raise ValueError(f"{where}: met is {r['met']!r} but verdict is {r['verdict']!r}")
    return payload


def write_json(path: str | os.PathLike | None, bench: str, rows: list[dict], argv: list[str] | None = None) -> dict:
    """Validate and (when ``path`` is given) write ``{"bench", "command", "rows"}``; returns the payload."""
    argv = sys.argv[1:] if argv is None else argv
    payload = validate({"bench": bench, "command": "python " + " ".join(shlex.quote(a) for a in [f"bench/{bench}.py", *argv]),
                        "rows": rows})
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2) + "\n")
    return payload


def fmt(value: float, unit: str = "") -> str:
    """A figure with 3 significant digits (no scientific notation for ordinary sizes)."""
    if value == 0:
        text = "0"
    elif abs(value) >= 100:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def print_rows(rows: list[dict]) -> None:
    """A plain-text table of rows (each bench prints its own before writing JSON)."""
    for r in rows:
        o, p = r["ours"], r["peer"]
        peer = f"{p['label']}: {fmt(p['median'], r['unit'])} ({fmt(p['min'])}-{fmt(p['max'])})" if p else "-"
        ratio = f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-"
        target = "" if r["target"] is None else f" target >= {r['target']:g}x: {verdict_text(r)}"
        print(f"{r['what']}\n  ours {o['label']}: {fmt(o['median'], r['unit'])} ({fmt(o['min'])}-{fmt(o['max'])})\n"
              f"  peer {peer}\n  ratio {ratio}{target}" + (f"\n  note: {r['note']}" if r["note"] else ""), flush=True)


def verdict_text(r: dict) -> str:
    """The row's verdict as printed: met, NOT met, or within noise (rows written before verdicts: from met)."""
    judged = r.get("verdict") or (None if r.get("met") is None else ("met" if r["met"] else "not met"))
    return {"met": "met", "not met": "NOT met", "within noise": "within noise (min-max ranges overlap)"}.get(judged, "no figure")


def time_calls(fn: Callable[[], object], runs: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``runs`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def alternate(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 0) -> dict[str, list]:
    """Call several contenders run after run, alternating their order (AB, BA, AB...), so load changes on a shared
    machine hit every side alike; returns what each call returned, per name. For measurements a call makes itself
    (a child process reporting its import time, a peak RSS); :func:`interleaved` times the calls."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    results: dict[str, list] = {name: [] for name in fns}
    names = list(fns)
    for run in range(runs):
        for name in names if run % 2 == 0 else names[::-1]:
            results[name].append(fns[name]())
    return results


def interleaved(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time several contenders run after run with :func:`alternate`. Returns seconds per call for each name."""
    def timed(fn):
        def call():
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start
        return call

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    return alternate({name: timed(fn) for name, fn in fns.items()}, runs)


def interleaved_wall_cpu(fns: dict[str, Callable[[], object]], runs: int, warmup: int = 1
                         ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """:func:`interleaved`, returning wall seconds and this process's CPU seconds (all its threads) per call. CPU
    time hardly moves with other processes' load where wall time does: on a shared machine it is the steadier
    figure of work done (single-threaded sides; threads that wait idle cost no CPU time)."""
    def timed(fn):
        def call():
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            return time.perf_counter() - wall, time.process_time() - cpu
        return call

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    pairs = alternate({name: timed(fn) for name, fn in fns.items()}, runs)
    return ({n: [w for w, _ in v] for n, v in pairs.items()}, {n: [c for _, c in v] for n, v in pairs.items()})


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another live process (all its threads; not its children), from
    /proc/PID/stat (fields 14-15, clock ticks): a server that stays up between the calls being timed. 0.0 when it
    is gone or the system has no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def setup_paths() -> None:
    """Make ``lavis_ext`` and ``tests/tiny_models`` importable from a bench run anywhere, and point the tiny
    configs at the synthetic data (``make data``) unless LAVIS_EXT_DATA says otherwise."""
    for path in (str(REPO), str(REPO / "tests")):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ.setdefault("LAVIS_EXT_DATA", str(REPO / "data" / "synthetic"))


def require_data() -> Path:
    """The synthetic dataset root; a clear error when `make data` has not run."""
    root = Path(os.environ.get("LAVIS_EXT_DATA", REPO / "data" / "synthetic"))
    if not (root / "sizes.json").is_file() or not (root / "tokenizers").is_dir():
        raise SystemExit(f"no synthetic dataset at {root} (sizes.json, tokenizers/); run `make data` first")
    return root
