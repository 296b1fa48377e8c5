"""Import cost of `import lavis_ext; lavis_ext.register()` (what every entry point runs) against `import lavis` itself, each in fresh interpreters.

Stock `import lavis` fails on this stack (moved transformers helpers), so the peer applies only that
one shim and then imports LAVIS. The two sides alternate run by run (AB, BA, ...: bench/common.alternate), so a
load change on a shared machine hits both; all-peer-then-all-ours measured 1.34x where alternating gives 0.98x.
Prints median/min/max of N runs and the difference.
Usage: python bench/import_time.py [--quick] [--runs 5] [--json OUT]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, alternate, print_rows, resolve_runs, row, stat, write_json  # noqa: E402

PEER = (
    "import time; t = time.perf_counter()\n"
    "import transformers.modeling_utils as m, transformers.pytorch_utils as p\n"
    "for n in ('apply_chunking_to_forward', 'find_pruneable_heads_and_indices', 'prune_linear_layer'):\n"
    "    setattr(m, n, getattr(p, n))\n"
    "import lavis\n"
    "print(time.perf_counter() - t)\n"
)
OURS = "import time; t = time.perf_counter()\nimport lavis_ext\nlavis_ext.register()\nprint(time.perf_counter() - t)\n"


def measure(code: str) -> float:
    """Seconds the import took in a fresh interpreter, as the child measured it."""
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__), runs=5, quick_runs=3)
    args = parser.parse_args(argv)
    runs = resolve_runs(args)
    sides = {"import lavis (+ transformers shim)": PEER, "import lavis_ext + register()": OURS}
    # one untimed import of each warms the file cache for both
    results = alternate({name: (lambda code=code: measure(code)) for name, code in sides.items()}, runs, warmup=1)
    for name, t in results.items():
        print(f"{name:40s} median {statistics.median(t):.2f} s (min {min(t):.2f}, max {max(t):.2f})")
    peer, ours = (stat(name, t) for name, t in results.items())
    extra = ours["median"] - peer["median"]
    worst = ours["max"] - peer["min"]  # the target is met only if even ours' slowest run against the peer's fastest meets it
    print(f"{'lavis_ext extra cost':40s} {extra:+.2f} s (ratio {ours['median'] / peer['median']:.2f}x)")
    rows = [row("import cost, fresh interpreter", "s", ours, peer, higher_is_better=False,
                note=f"lavis_ext adds {extra:+.2f} s over importing LAVIS itself (worst case over the runs {worst:+.2f} s); "
                     f"target <= +1 s: {'met' if worst <= 1.0 else 'NOT met'} (registration imports LAVIS, which is most "
                     "of the cost); sides alternate run by run")]
    print_rows(rows)
    write_json(args.json, "import_time", rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
