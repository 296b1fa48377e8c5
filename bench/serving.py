"""HTTP captioning throughput and latency: our micro-batching server against one generate per request.

Peer (the common example): a plain FastAPI app whose ``async def`` endpoint reads the upload, opens it with PIL
and calls ``predictor.caption([image])`` inline: one forward pass per request, requests served one after the
other. A second peer, for the 32-client rows: the same with a plain ``def`` handler, which FastAPI runs in its
thread pool, so forward passes overlap (still one image each) and use both cores. Ours: ``lavis-ext serve`` (``lavis_ext.serve.server``), which validates uploads in a thread pool and
gathers concurrent requests into batched ``generate`` calls (``--max-batch 16``, ``--max-wait-ms 5``), with
``--workers 2`` (two batches at once: one forward pass of this small model cannot keep two cores busy, and the
threaded peer uses both cores too). The fair peer that batches: LitServe (``pip install -e .[bench]``) with the
same ``max_batch_size``, ``batch_timeout`` (= our max wait) and inference workers (separate processes in LitServe),
its handler decoding the upload as the plain peers do; its rows are left out when it is not installed.

Both load the same model through ``lavis_ext.inference.load``: the tiny BLIP-2 OPT config widened (OPT 4 x 256,
ViT 4 x 128, Q-Former 128; random init: throughput does not depend on the weights) with greedy decoding of
exactly 16 new tokens (min = max), so every request costs the same. Each server runs in its own subprocess on
127.0.0.1 with the same torch thread count (``--threads``, default 1, ``OMP_NUM_THREADS`` set to match: on the
shared 2-core reference machine, 2 OpenMP threads per server made single-request latency swing by 10x when other
processes held the cores, which measures the scheduler, not the servers); the load generator is an httpx async client in this process. For each run and
each concurrency (1, 8, 32 clients) the peer and ours are driven alternately with the same fixed number of
requests (64 x 64 PNGs), after a warm-up, so load changes on a shared machine hit both.

Rows: throughput ratio (ours / peer) at 1, 8 and 32 clients (targets, issue 18, against the async peer: 1.0 at 1
and 8.0 at 32), and p50 / p99 latency at 32 clients (ratio peer / ours; p99 target 1.0: no worse), against each
peer at 32 clients. The rows against the async peer say where a request's CPU goes: each server process's CPU time
(/proc) and the load generator's per request, and the part of ours' spent in model calls (its ``/stats``).
Usage: python bench/serving.py [--quick] [--runs N] [--json OUT] [--threads 1] [--max-batch 16]
"""

import argparse
import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, print_rows, process_cpu_seconds, resolve_runs, row, stat, write_json  # noqa: E402

from lavis_ext.serve import batching  # noqa: E402  (stdlib only: the server's batching defaults)

REPO = Path(__file__).resolve().parents[1]
PROJECT = REPO / "projects/tiny/caption_opt.yaml"
# Wide enough that a forward pass (not HTTP) dominates a request; random init is fine for throughput.
WIDEN = [
    "model.opt_config.hidden_size=256", "model.opt_config.ffn_dim=1024", "model.opt_config.num_hidden_layers=4",
    "model.opt_config.num_attention_heads=8", "model.opt_config.word_embed_proj_dim=256",
    "model.vit_config.width=128", "model.vit_config.depth=4",
    "model.qformer_config.hidden_size=128", "model.qformer_config.intermediate_size=512",
    "run.num_beams=1", "run.max_len=16", "run.min_len=16",
]
CLIENTS = (1, 8, 32)
# The peers: a FastAPI async handler (every row), a `def` handler in FastAPI's thread pool (32-client rows), and
# LitServe's batching (every row; the fair peer that batches, when the `bench` extra is installed).
PEERS = {"peer": "async", "peer_threaded": "thread", "peer_litserve": "litserve"}
PEER_LABELS = {"peer": "FastAPI async handler, one generate per request",
               "peer_threaded": "FastAPI def handler (thread pool), one generate per request",
               "peer_litserve": "LitServe, batched (same max batch, wait and workers as ours)"}
SERVERS = ("peer", "peer_threaded", "peer_litserve", "ours")
PEER_NAMES = {"peer": "async handler", "peer_threaded": "thread handler", "peer_litserve": "LitServe batching"}
EVERY_ROW = ("peer", "peer_litserve")  # the peers run at every client count; the others at 32 only


def cpu_breakdown(results: dict, max_batch: int) -> dict[int, str]:
    """Notes for the rows against the async peer: where the CPU of a request goes, from this run's figures (the
    servers' CPU time from /proc, the load generator's, and the part of ours' spent in the model calls, from its
    /stats)."""
    def med(name, clients, key):
        return stat(key, [m[key] for m in results[name][clients]])["median"]

    def spread(name, clients, key):
        found = stat(key, [m[key] for m in results[name][clients]])
        return f"{found['min']:.1f}-{found['max']:.1f} ms"

    cores = os.cpu_count() or 1
    peer32 = med("peer", 32, "throughput")
    budget = cores * 1000 / (8 * peer32)  # CPU ms a request may take, server and client together, for 8x
    return {
        1: f"; CPU per request (medians): ours' server {med('ours', 1, 'server_cpu_ms'):.1f} ms, of which the "
           f"model call {med('ours', 1, 'model_cpu_ms'):.1f} ms (min-max over the runs {spread('ours', 1, 'model_cpu_ms')}: "
           f"the same call's CPU time moves this much between runs on this machine); the peer's server "
           f"{med('peer', 1, 'server_cpu_ms'):.1f} ms (the same model call plus its handler)",
        32: f"; 8x the peer's {peer32:.1f} req/s needs {8 * peer32:.0f} req/s, at most {budget:.1f} ms of CPU per "
            f"request on the {cores} cores for server and load generator together; measured per request: ours' "
            f"server {med('ours', 32, 'server_cpu_ms'):.1f} ms, of which the model calls (batches of up to "
            f"{max_batch}) {med('ours', 32, 'model_cpu_ms'):.1f} ms (the rest is HTTP, upload checks and the "
            f"batcher), the load generator "
            f"(httpx, in the bench process) {med('ours', 32, 'client_cpu_ms'):.1f} ms",
    }


def model_cpu_s(url: str) -> float:
    """CPU seconds ours' server has spent in model calls so far (its /stats)."""
    import httpx

    return float(httpx.get(url + "/stats", timeout=30).json()["model_cpu_s"])


def has_litserve() -> bool:
    import importlib.util

    return importlib.util.find_spec("litserve") is not None


# ---- the peer server (runs in a subprocess: python bench/serving.py --baseline-server ...) ------------
def baseline_app(predictor, style: str):
    """The usual FastAPI example: one ``generate`` per request, inside the request handler.

    ``async``: an ``async def`` handler (requests run one after the other on the event loop);
    ``thread``: a plain ``def`` handler, which FastAPI runs in its thread pool (requests overlap).
    """
    from fastapi import FastAPI, File, UploadFile
    from PIL import Image

    app = FastAPI()

    @app.get("/readyz")
    async def readyz():
        return {"status": "ready"}

    if style == "async":
        @app.post("/v1/caption")
        async def caption(image: UploadFile = File(...)):  # noqa: B008  (FastAPI's idiom)
            pil = Image.open(io.BytesIO(await image.read())).convert("RGB")
            return {"caption": predictor.caption([pil])[0]}
    else:
        @app.post("/v1/caption")
        def caption_in_thread(image: UploadFile = File(...)):  # noqa: B008
            pil = Image.open(io.BytesIO(image.file.read())).convert("RGB")
            return {"caption": predictor.caption([pil])[0]}

    return app


def serve_baseline(port: int, threads: int, style: str, options: list[str]) -> None:
    import torch
    import uvicorn

    from lavis_ext.inference import load

    torch.set_num_threads(threads)
    predictor = load(cfg_path=PROJECT, options=options, device="cpu")
    uvicorn.run(baseline_app(predictor, style), host="127.0.0.1", port=port, log_level="warning")


# ---- driving ----------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_images(count: int = 32) -> list[bytes]:
    from PIL import Image, ImageDraw

    out = []
    for i in range(count):
        image = Image.new("RGB", (64, 64), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        ImageDraw.Draw(image).ellipse((8 + i % 9, 10, 50, 40 + i % 13), fill=((i * 11) % 256, 200, 90))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        out.append(buffer.getvalue())
    return out


async def drive(url: str, clients: int, requests: int, images: list[bytes], server_pid: int | None = None) -> dict:
    """``clients`` concurrent clients send ``requests`` captions in all; throughput and latency percentiles, and CPU
    ms per request of this process (the load generator) and of the server process ``server_pid`` (its own threads;
    a server whose work runs in child processes, LitServe's, is not counted)."""
    import httpx
    import numpy as np

    latencies: list[float] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def one_client():
            for n in counter:
                files = {"image": (f"{n}.png", images[n % len(images)], "image/png")}
                start = time.perf_counter()
                reply = await client.post("/v1/caption", files=files)
                latencies.append(time.perf_counter() - start)
                if reply.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {reply.status_code}: {reply.text[:200]}")

        server0 = process_cpu_seconds(server_pid) if server_pid else 0.0
        start, client0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        wall, client = time.perf_counter() - start, time.process_time() - client0
        server = process_cpu_seconds(server_pid) - server0 if server_pid else 0.0
    ms = np.array(latencies) * 1000
    return {"throughput": requests / wall, "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
            "client_cpu_ms": client * 1000 / requests, "server_cpu_ms": server * 1000 / requests}


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with code {process.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server {url} not ready after {timeout} s")


def tokenizer_root(tmp: Path) -> str:
    """LAVIS_EXT_DATA with tokenizers: the environment's, ./data/synthetic, or a small one built here."""
    for candidate in (os.environ.get("LAVIS_EXT_DATA"), str(REPO / "data/synthetic")):
        if candidate and (Path(candidate) / "tokenizers/opt").is_dir():
            return candidate
    from lavis_ext.datasets.synthetic import generate_dataset

    generate_dataset(tmp / "synthetic", seed=0, num_images={"train": 64, "val": 8, "test": 8}, tokenizers=True)
    return str(tmp / "synthetic")


def pause_group(process, paused: bool) -> None:
    """SIGSTOP (``paused``) or SIGCONT a server's whole process group (its forked and spawned workers too)."""
    import signal

    try:
        os.killpg(process.pid, signal.SIGSTOP if paused else signal.SIGCONT)
    except ProcessLookupError:
        pass
    if not paused:
        time.sleep(0.2)  # resumed timers and pollers settle before the clients start


def stop_groups(processes, grace_s: float = 30.0) -> None:
    """SIGTERM every server's process group, wait up to ``grace_s``, then SIGKILL what is left of each group."""
    import signal

    def signal_group(process, sig) -> None:
        try:
            os.killpg(process.pid, sig)  # the group id is the leader's pid (start_new_session=True)
        except ProcessLookupError:
            pass

    processes = list(processes)
    for process in processes:
        signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    time.sleep(0.5)  # let forked children act on the SIGTERM too
    for process in processes:
        signal_group(process, signal.SIGKILL)  # a no-op for a group that is gone
        process.wait()


def tail_note(results: dict, peer: str, max_batch: int) -> str:
    """Why p99 at 32 clients sits near a batching peer's, from the runs: the tail (p99 - p50) against one batch's
    model time."""
    tail = {name: stat(name, [m["p99"] - m["p50"] for m in results[name][32]])["median"] for name in ("ours", peer)}
    model_ms = [m["model_cpu_ms"] for m in results["ours"][32] if "model_cpu_ms" in m]
    if not model_ms:
        return ""
    return (f"; p99 - p50 (medians): ours {tail['ours']:.0f} ms, the peer {tail[peer]:.0f} ms, where a full batch of "
            f"{max_batch} is ~{max_batch * stat('model', model_ms)['median']:.0f} ms of model time on ours (/stats): "
            "a request that "
            "arrives just after a batch has started waits up to one batch on either server (both batch), so the "
            "tail stays under one batch on both and p99 ties within the run-to-run spread")


def main(argv: list[str] | None = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]), runs=5, quick_runs=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each server (default 1)")
    parser.add_argument("--max-batch", type=int, default=batching.DEFAULT_MAX_BATCH,
                        help=f"our server's --max-batch (default {batching.DEFAULT_MAX_BATCH}, its default)")
    parser.add_argument("--max-wait-ms", type=float, default=batching.DEFAULT_MAX_WAIT_MS,
                        help=f"our server's --max-wait-ms (default {batching.DEFAULT_MAX_WAIT_MS:g}, its default)")
    parser.add_argument("--workers", type=int, default=2,
                        help="our server's --workers (default 2: one batch per core of the 2-core reference machine)")
    parser.add_argument("--baseline-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--style", default="async", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline_server:
        if args.style == "litserve":
            from peers.litserve_peer import serve

            serve(args.port, args.threads, WIDEN, args.max_batch, args.max_wait_ms, args.workers)
        else:
            serve_baseline(args.port, args.threads, args.style, WIDEN)
        return 0
    servers = SERVERS if has_litserve() else tuple(n for n in SERVERS if n != "peer_litserve")
    if "peer_litserve" not in servers:
        print("litserve is not installed (pip install -e .[bench]): the batched peer's rows are left out", flush=True)

    runs = resolve_runs(args)
    requests = {1: 36, 8: 72, 32: 128} if args.quick else {1: 72, 8: 144, 32: 256}
    images = test_images()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "LAVIS_EXT_DATA": tokenizer_root(Path(tmp)), "OMP_NUM_THREADS": str(args.threads),
               "PYTHONWARNINGS": "ignore"}
        ports = {name: free_port() for name in servers}
        commands = {
            **{peer: [sys.executable, __file__, "--baseline-server", "--port", str(ports[peer]),
                      "--threads", str(args.threads), "--style", style, "--max-batch", str(args.max_batch),
                      "--max-wait-ms", str(args.max_wait_ms), "--workers", str(args.workers)]
               for peer, style in PEERS.items() if peer in servers},
            "ours": [sys.executable, "-m", "lavis_ext.serve.server", "--cfg-path", str(PROJECT), "--options", *WIDEN,
                     "--device", "cpu", "--port", str(ports["ours"]), "--threads", str(args.threads),
                     "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                     "--workers", str(args.workers),
                     "--log-level", "warning"],
        }
        # Each server in its own process group, stopped as a group: LitServe's server forks a process and spawns
        # its workers, which outlived a plain terminate() of the one we started and kept polling (~7-13% of a
        # core each) through every later benchmark.
        processes = {name: subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True)
                     for name, cmd in commands.items()}
        urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        results = {name: {c: [] for c in CLIENTS} for name in urls}
        try:
            for name, url in urls.items():
                wait_ready(url, processes[name])
                for clients in (1, 32):  # warm-up: first calls, and the batched shapes
                    asyncio.run(drive(url, clients, clients, images))
            # Only the server being driven runs: the others are stopped (SIGSTOP to their groups), because an idle
            # LitServe polls its queues (~30% of a core for its 3 processes), which loaded whichever server was driven.
            for name in servers:
                pause_group(processes[name], True)
            for run in range(runs):
                for clients in CLIENTS:
                    for name in servers:
                        if name not in (*EVERY_ROW, "ours") and clients != 32:  # the thread peer: 32 clients only
                            continue
                        pause_group(processes[name], False)
                        try:
                            before = model_cpu_s(urls[name]) if name == "ours" else 0.0
                            measured = asyncio.run(drive(urls[name], clients, requests[clients], images,
                                                         processes[name].pid))
                            if name == "ours":
                                measured["model_cpu_ms"] = (model_cpu_s(urls[name]) - before) * 1000 / requests[clients]
                        finally:
                            pause_group(processes[name], True)
                        results[name][clients].append(measured)
                        print(f"run {run + 1}/{runs} {name:13s} {clients:2d} clients: {measured['throughput']:7.2f} req/s  "
                              f"p50 {measured['p50']:8.1f} ms  p99 {measured['p99']:8.1f} ms", flush=True)
        finally:
            for process in processes.values():
                pause_group(process, False)  # a stopped process would not act on SIGTERM
            stop_groups(processes.values())
    why = cpu_breakdown(results, args.max_batch)

    rows = []
    ours_label = (f"lavis-ext serve (max_batch {args.max_batch}, max_wait {args.max_wait_ms:g} ms, "
                  f"workers {args.workers})")
    for clients in CLIENTS:
        for peer in (p for p in (PEERS if clients == 32 else EVERY_ROW) if p in servers):
            rows.append(row(
                f"caption throughput, {clients} concurrent client(s), vs {PEER_NAMES[peer]}", "req/s",
                stat(ours_label, [m["throughput"] for m in results["ours"][clients]]),
                stat(PEER_LABELS[peer], [m["throughput"] for m in results[peer][clients]]),
                target={1: 1.0, 32: 8.0}.get(clients) if peer == "peer" else None,  # issue 18 (vs the async peer): never slower alone, 8x at 32
                note=f"{requests[clients]} requests per run, {runs} run(s), torch threads {args.threads}"
                     + (why.get(clients, "") if peer == "peer" else "")))
    for peer, style in PEERS.items():
        if peer not in servers:
            continue
        for key, target in (("p50", None), ("p99", 1.0)):
            rows.append(row(
                f"{key} latency, 32 concurrent clients, vs {PEER_NAMES[peer]}", "ms",
                stat(ours_label, [m[key] for m in results["ours"][32]]),
                stat(PEER_LABELS[peer], [m[key] for m in results[peer][32]]),
                higher_is_better=False, target=target, note=f"ratio = peer / ours; {requests[32]} requests per run"
                + (tail_note(results, peer, args.max_batch) if key == "p99" and peer == "peer_litserve" else "")))
    print_rows(rows)
    write_json(args.json, "serving", rows, argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
