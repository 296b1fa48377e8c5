"""Import cost of `import lavis_ext` against `import lavis` itself, each in fresh interpreters.

Stock `import lavis` fails on this stack (moved transformers helpers), so the peer applies only that
one shim and then imports LAVIS. Prints median/min/max of N runs and the difference.
Usage: python bench/import_time.py [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

PEER = (
    "import time; t = time.perf_counter()\n"
    "import transformers.modeling_utils as m, transformers.pytorch_utils as p\n"
    "for n in ('apply_chunking_to_forward', 'find_pruneable_heads_and_indices', 'prune_linear_layer'):\n"
    "    setattr(m, n, getattr(p, n))\n"
    "import lavis\n"
    "print(time.perf_counter() - t)\n"
)
OURS = "import time; t = time.perf_counter()\nimport lavis_ext\nprint(time.perf_counter() - t)\n"


def measure(code: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    measure(OURS, 1)  # warm the file cache for both
    results = {}
    for name, code in (("import lavis (+ transformers shim)", PEER), ("import lavis_ext", OURS)):
        t = measure(code, args.runs)
        results[name] = (statistics.median(t), min(t), max(t))
        print(f"{name:40s} median {results[name][0]:.2f} s (min {results[name][1]:.2f}, max {results[name][2]:.2f})")
    (peer, ours) = (v[0] for v in results.values())
    print(f"{'lavis_ext extra cost':40s} {ours - peer:+.2f} s (ratio {ours / peer:.2f}x)")
    return results


if __name__ == "__main__":
    main()
