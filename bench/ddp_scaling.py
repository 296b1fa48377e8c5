"""DDP scaling of the tiny BLIP-2 OPT on CPU: training samples/s of 2 processes against 1.

Each configuration trains the tiny captioner (`projects/tiny/caption_opt.yaml`, batch 16 per process)
for a warm-up epoch and a timed epoch of `--steps` steps through the real runner (torchrun, gloo);
samples/s = processes x batch x steps / time of the timed epoch. Configurations: 1 process x 1 thread,
1 process x 2 threads (the same cores as 2 x 1), 2 processes x 1 thread. Efficiency = (2-process
samples/s) / (2 x 1-process-1-thread samples/s).

Each configuration is one timed epoch (a fresh torchrun each); --runs repeats the set, the configurations
alternating their order run by run (bench/common.alternate) so load changes hit all alike.
Usage: python bench/ddp_scaling.py [--quick] [--runs 2] [--json OUT] [--steps 40] [--data data/synthetic]
(--quick: 10 steps.)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import add_common_args, alternate, print_rows, resolve_runs, row, stat, write_json  # noqa: E402


def worker(argv):
    from lavis_ext import cli

    result = {}

    def action(runner):
        runner.train_epoch(0)  # warm-up (loader start, allocator)
        start = time.perf_counter()
        runner.train_epoch(1)
        seconds = time.perf_counter() - start
        steps = len(runner.train_loader)
        batch = int(runner.config.run_cfg.batch_size_train)
        from lavis.common.dist_utils import get_world_size

        result.update(seconds=seconds, samples_per_s=get_world_size() * batch * steps / seconds, world=get_world_size(), steps=steps)
        return result

    cli._run(argv, "ddp scaling worker", action)
    from lavis.common.dist_utils import is_main_process

    if is_main_process():
        print("RESULT " + json.dumps(result), flush=True)
    cli.ext_dist.shutdown()


def run(nproc: int, threads: int, steps: int, data: Path) -> dict:
    batch = 16
    with tempfile.TemporaryDirectory() as out:
        options = [f"run.output_dir={out}", f"run.batch_size_train={batch}", "run.num_workers=0", "run.max_epoch=2",
                   "run.valid_splits=[]", "run.test_splits=[]", "run.log_freq=1000",
                   f"datasets.wds_caption.build_info.root={data}",
                   f"datasets.wds_caption.build_info.lengths.train={nproc * batch * steps}"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LAVIS_EXT_DATA": str(data), "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               __file__, "--worker", "--cfg-path", str(REPO / "projects/tiny/caption_opt.yaml"), "--options", *options]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            raise SystemExit(proc.stderr[-3000:])
        return json.loads(line[len("RESULT "):])


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--worker":
        return worker(argv[1:])
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), runs=2, quick_runs=2)
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 40, 10 with --quick)")
    parser.add_argument("--data", default=os.environ.get("LAVIS_EXT_DATA", str(REPO / "data/synthetic")))
    args = parser.parse_args(argv)
    runs = resolve_runs(args)
    steps = args.steps or (10 if args.quick else 40)
    data = Path(args.data).resolve()
    def config_run(nproc: int, threads: int):
        def call() -> float:
            r = run(nproc, threads, steps, data)
            print(f"{nproc} process(es) x {threads} thread(s): {r['samples_per_s']:.1f} samples/s "
                  f"({r['steps']} steps of {16 * nproc} samples in {r['seconds']:.2f} s)", flush=True)
            return r["samples_per_s"]
        return call

    rates = alternate({(n, t): config_run(n, t) for n, t in ((1, 1), (1, 2), (2, 1))}, runs)
    two = stat("2 processes x 1 thread", rates[(2, 1)])
    one = stat("1 process x 1 thread", rates[(1, 1)])
    both = stat("1 process x 2 threads", rates[(1, 2)])
    print(f"scaling 2 processes vs 1 (1 thread each): {two['median'] / one['median']:.2f}x, "
          f"efficiency {two['median'] / (2 * one['median']):.0%}; vs 1 process x 2 threads: {two['median'] / both['median']:.2f}x")
    what = "DDP scaling, tiny OPT through the real runner (gloo), batch 16 per process: samples/s"
    rows = [row(f"{what}, vs 1 process", "samples/s", two, one,
                note=f"efficiency {two['median'] / (2 * one['median']):.0%} on {os.cpu_count()} cores; {steps} steps, one timed epoch per configuration and run, {runs} runs alternating"),
            row(f"{what}, vs 1 process on the same 2 cores", "samples/s", two, both,
                note="1 process with 2 intra-op threads uses the same cores as 2 x 1")]
    print_rows(rows)
    write_json(args.json, "ddp_scaling", rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
