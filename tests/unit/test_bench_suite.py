"""The benchmark suite's plumbing: the JSON row schema, the BENCHMARKS.md writer, failure handling of run_all,
discovery of bench scripts, and that every bench script answers ``--help`` (no figures are measured here)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    spec.loader.exec_module(module)
    return module


common = _load("common")
run_all = _load("run_all")


def fake_payload(bench="fake", ratio_ok=True):
    ours = common.stat("ours thing", [10.5, 12.0, 11.0])
    peer = common.stat("their thing", [10.0, 10.0, 10.0] if ratio_ok else [20.0, 22.0, 21.0])
    rows = [
        common.row("throughput of X", "items/s", ours, peer, target=1.0, note="because Y"),
        common.row("time of Z", "s", common.stat("ours", [2.0]), common.stat("peer", [4.0]), higher_is_better=False),
        common.row("figure with no peer", "MiB", common.stat("ours", [5.0])),
    ]
    return common.write_json(None, bench, rows, ["--quick"])


# ---- rows and schema -------------------------------------------------------------------------
def test_row_ratio_means_ours_is_better_above_one_for_rates_and_times():
    rate = common.row("r", "x/s", common.stat("o", [30.0]), common.stat("p", [10.0]), target=2.0)
    time_ = common.row("t", "s", common.stat("o", [1.0]), common.stat("p", [3.0]), higher_is_better=False, target=4.0)
    assert rate["ratio"] == pytest.approx(3.0) and rate["met"] is True
    assert time_["ratio"] == pytest.approx(3.0) and time_["met"] is False
    assert common.row("n", "s", common.stat("o", [1.0]))["ratio"] is None


def test_stat_is_median_min_max():
    assert common.stat("x", [3, 1, 2, 10]) == {"label": "x", "median": 2.5, "min": 1.0, "max": 10.0}
    with pytest.raises(ValueError, match="x: no measurements"):
        common.stat("x", [])


def test_written_json_round_trips_through_the_validator(tmp_path):
    out = tmp_path / "r.json"
    payload = common.write_json(out, "fake", fake_payload()["rows"], ["--quick", "--json", str(out)])
    assert json.loads(out.read_text()) == payload
    assert payload["command"] == f"python bench/fake.py --quick --json {out}"
    assert common.validate(json.loads(out.read_text())) == payload


@pytest.mark.parametrize(
    "breaks, message",
    [
        (lambda p: p.pop("rows"), "no 'rows'"),
        (lambda p: p["rows"][0].pop("unit"), "row 0: missing \\['unit'\\]"),
        (lambda p: p["rows"][0]["ours"].pop("median"), "row 0: 'ours' must be an object"),
        (lambda p: p["rows"][1]["peer"].update(min="fast"), "row 1: peer.min is 'fast'"),
        (lambda p: p["rows"][0].update(ratio="2x"), "row 0: ratio is '2x'"),
        (lambda p: p["rows"][0].update(met="yes"), "row 0: met is 'yes'"),
    ],
)
def test_validator_names_the_broken_field(breaks, message):
    payload = fake_payload()
    breaks(payload)
    with pytest.raises(ValueError, match=message):
        common.validate(payload)


def test_quick_and_runs_arguments():
    import argparse

    parser = common.add_common_args(argparse.ArgumentParser(), runs=7, quick_runs=2)
    assert common.resolve_runs(parser.parse_args([])) == 7
    assert common.resolve_runs(parser.parse_args(["--quick"])) == 2
    assert common.resolve_runs(parser.parse_args(["--quick", "--runs", "4"])) == 4
    with pytest.raises(SystemExit, match="--runs 0"):
        common.resolve_runs(parser.parse_args(["--runs", "0"]))


# ---- the report ---------------------------------------------------------------------------------
INFO = {"cpu": "Test CPU", "cores": 2, "memory": "8 GiB", "os": "Linux", "python": "3.11.7",
        "versions": {"torch": "2.14.1", "transformers": "4.57.6"}}


def test_markdown_has_machine_figures_verdicts_failures_and_pending_gpu_rows():
    results = [fake_payload("good"), fake_payload("slow", ratio_ok=False),
               run_all.failure("broken", "exit code 1: ImportError: no module named x")]
    text = run_all.render_markdown(results, INFO, gpu=None, date="2026-11-27", load=(1.0, 2.0), seconds=600)
    assert "Test CPU, 2 CPU cores, 8 GiB" in text and "torch 2.14.1" in text and "Date: 2026-11-27" in text
    assert "| good | throughput of X | ours thing: 11.0 items/s (10.5-12.0) | their thing: 10.0 items/s (10.0-10.0) | 1.10x | >= 1x: met | because Y |" in text
    assert "| slow | throughput of X |" in text and "0.52x | >= 1x: **not met** | because Y" in text
    assert "| good | time of Z | ours: 2.00 s (2.00-2.00) | peer: 4.00 s (4.00-4.00) | 2.00x | none |" in text
    assert "| good | figure with no peer | ours: 5.00 MiB (5.00-5.00) | - | - | none |" in text
    assert "| broken | (whole bench) | - | - | - | - | **failed**: exit code 1: ImportError: no module named x |" in text
    # the why of every miss is repeated under its heading
    missed = text.split("## Targets missed and why")[1]
    assert "slow, throughput of X: 0.52x against a target of 1x. because Y" in missed
    assert "broken: no figures, exit code 1" in missed
    assert text.count("pending: no device in this run") == len(run_all.GPU_PENDING)
    assert "No figures: no `make demo` run was looked for" in text  # no hand-typed demo figures



def test_met_only_when_the_ranges_separate():
    """A median ratio above the target is "met" only when ours' slowest run beats the peer's fastest (for a target
    of 1); overlapping ranges are "within noise", and a peer clearly ahead is "not met"."""
    peer = common.stat("p", [10.0, 11.0, 12.0])
    noisy = common.row("x", "x/s", common.stat("o", [11.0, 13.0, 12.5]), peer, target=1.0)
    assert noisy["ratio"] > 1 and noisy["verdict"] == "within noise" and noisy["met"] is False
    clear = common.row("x", "x/s", common.stat("o", [12.5, 13.0, 14.0]), peer, target=1.0)
    assert clear["verdict"] == "met" and clear["met"] is True
    touching = common.row("x", "x/s", common.stat("o", [12.0, 13.0, 14.0]), peer, target=1.0)
    assert touching["verdict"] == "within noise"  # ours' min equals the peer's max: not separated
    behind = common.row("x", "x/s", common.stat("o", [5.0, 6.0, 7.0]), peer, target=1.0)
    assert behind["verdict"] == "not met" and behind["met"] is False
    # times: lower is better; a target above 1 needs the worst case (peer's fastest / ours' slowest) above it
    t = common.row("t", "s", common.stat("o", [1.0, 1.1]), common.stat("p", [2.4, 2.6]), higher_is_better=False, target=2.0)
    assert common.ratio_bounds(t["ours"], t["peer"], False) == pytest.approx((2.4 / 1.1, 2.6 / 1.0))
    assert t["verdict"] == "met"
    assert common.row("t", "s", common.stat("o", [1.0, 1.4]), common.stat("p", [2.4, 2.6]), higher_is_better=False,
                      target=2.0)["verdict"] == "within noise"
    assert common.row("n", "s", common.stat("o", [1.0]), peer)["verdict"] is None  # no target, no verdict
    assert common.verdict_text(noisy) == "within noise (min-max ranges overlap)" and common.verdict_text(behind) == "NOT met"


def test_noisy_rows_are_reported_as_within_noise_not_met(tmp_path):
    noisy = common.row("speed of W", "x/s", common.stat("o", [11.0, 13.0]), common.stat("p", [10.0, 12.0]), target=1.0)
    payload = common.write_json(None, "noisy", [noisy], ["--quick"])
    payload["rows"][0]["verdict"] = "met"
    with pytest.raises(ValueError, match="met is False but verdict is 'met'"):
        common.validate(payload)
    payload["rows"][0]["verdict"] = "within noise"
    text = run_all.render_markdown([payload], INFO, None, "d")
    assert "| 1.09x | >= 1x: within noise (min-max ranges overlap) |" in text
    assert "noisy, speed of W: median 1.09x against a target of 1x, within noise" in text.split("## Targets missed and why")[1]


def test_saved_rows_are_judged_again_by_todays_rule():
    """A results file written before verdicts existed said "met" for a median above the target alone."""
    old = common.write_json(None, "old", [common.row("speed", "x/s", common.stat("o", [11.0, 13.0]),
                                                      common.stat("p", [10.0, 12.0]), target=1.0)], ["--quick"])
    old["rows"][0].pop("verdict")
    old["rows"][0]["met"] = True
    text = run_all.render_markdown([old], INFO, None, "d")
    assert ">= 1x: within noise" in text and ">= 1x: met" not in text


def test_demo_figures_come_from_the_newest_demo_run(tmp_path):
    assert "no finished `make demo` run" in run_all.demo_figures(tmp_path / "none")["missing"]
    older, newer = tmp_path / "20261101000000", tmp_path / "20261202000000"
    for run, cider in ((older, 1.0), (newer, 3.16)):
        run.mkdir()
        (run / "test_epoch9_metrics.json").write_text(json.dumps(
            {"metrics": {"CIDEr": cider, "constant_baseline_CIDEr": 1.016, "constant_baseline_caption": "a red circle"}}))
    (newer / "run.log").write_text("... Training time 0:07:41\n")
    demo = run_all.demo_figures(tmp_path)
    assert demo["cider"] == 3.16 and demo["train_seconds"] == 461 and demo["run"].endswith("20261202000000")
    text = run_all.render_markdown([], INFO, None, "d", demo=demo)
    assert "| demo quality (test CIDEr-D, greedy) | 3.16 | best single constant caption: 1.02 | 3.11x | >= 3: met; >= 3x: met |" in text
    assert "7 min 41 s" in text and "None in this run." in text
    (newer / "test_epoch9_metrics.json").write_text(json.dumps({"metrics": {"CIDEr": 3.02, "constant_baseline_CIDEr": 1.02}}))
    missed = run_all.render_markdown([], INFO, None, "d", demo=run_all.demo_figures(tmp_path)).split("## Targets missed and why")[1]
    assert "CIDEr-D 2.96x the best constant caption against 3x" in missed


def test_demo_seed_row_reads_each_seed_run_and_judges_the_median(tmp_path):
    assert run_all.demo_seed_figures(tmp_path / "none") == [] and run_all.demo_seed_table([]) == ([], [])
    for seed, cider in ((42, 3.683), (43, 3.762), (44, 3.849)):
        run = tmp_path / f"seed{seed}" / "20261206000000"
        run.mkdir(parents=True)
        (run / "log.txt").write_text(json.dumps({"run": {"seed": seed}, "model": {"arch": "blip2_opt_ext"}}) + "\n")
        (run / "test_epochbest_metrics.json").write_text(json.dumps(
            {"metrics": {"CIDEr": cider, "constant_baseline_CIDEr": 1.016}}))
    seeds = run_all.demo_seed_figures(tmp_path)
    assert [s["seed"] for s in seeds] == [42, 43, 44]
    text = run_all.render_markdown([], INFO, None, "d", demo={"missing": "none", "seeds": seeds})
    assert "3.683 / 3.762 / 3.849: median 3.762, mean 3.765 ± 0.083" in text
    assert "median >= 3.5: met; every seed >= 3x: met" in text and "None in this run." in text
    seeds[1]["cider"] = seeds[2]["cider"] = 3.1
    missed = run_all.render_markdown([], INFO, None, "d", demo={"missing": "none", "seeds": seeds})
    assert "median test CIDEr-D 3.100 against 3.5" in missed.split("## Targets missed and why")[1]


def test_run_all_writes_no_hand_typed_figures():
    source = (BENCH / "run_all.py").read_text()
    assert "RECORDED" not in source and "3.02" not in source and "2.97" not in source


def test_alternate_swaps_the_order_every_run():
    calls = []
    out = common.alternate({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2}, runs=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"] and out == {"a": [1, 1, 1], "b": [2, 2, 2]}
    times = common.interleaved({"a": lambda: None}, runs=2, warmup=0)
    assert len(times["a"]) == 2 and all(t >= 0 for t in times["a"])


def test_markdown_shows_gpu_rows_when_results_exist(tmp_path):
    gpu = fake_payload("gpu_step")
    gpu["machine"] = {"gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-28", "torch": "2.14.1"}
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(gpu))
    text = run_all.render_markdown([], INFO, gpu=run_all.load_gpu(path), date="2026-11-28")
    assert "pending: no device" not in text
    assert "NVIDIA H100 80GB HBM3" in text and "| throughput of X | ours thing: 11.0 items/s" in text
    path.write_text("{}")
    assert "is not a valid results file" in run_all.load_gpu(path)["error"]


def test_cells_escape_pipes():
    payload = fake_payload()
    payload["rows"][0]["note"] = "a | b"
    assert "a \\| b" in run_all.render_markdown([payload], INFO, None, "d")


# ---- running benches ------------------------------------------------------------------------------
def _fake_bench(folder: Path, name: str, body: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(body))


def test_run_one_collects_rows_and_reports_failures_without_raising(tmp_path, monkeypatch):
    benches, out = tmp_path / "bench", tmp_path / "out"
    benches.mkdir(), out.mkdir()
    good = json.dumps(fake_payload("good"))
    _fake_bench(benches, "good", f"""
        import sys
        path = sys.argv[sys.argv.index("--json") + 1]
        assert "--quick" in sys.argv
        open(path, "w").write({good!r})
    """)
    _fake_bench(benches, "crash", "raise SystemExit('cannot find the data: run make data')")
    _fake_bench(benches, "silent", "print('no json written')")
    _fake_bench(benches, "garbage", """
        import sys
        open(sys.argv[sys.argv.index("--json") + 1], "w").write('{"bench": "garbage"}')
    """)
    _fake_bench(benches, "slow", "import time; time.sleep(30)")
    monkeypatch.setattr(run_all, "BENCH_DIR", benches)
    assert run_all.run_one("good", out, quick=True, timeout_s=30)["rows"] == json.loads(good)["rows"]
    assert "cannot find the data: run make data" in run_all.run_one("crash", out, True, 30)["error"]
    assert "wrote no --json output" in run_all.run_one("silent", out, True, 30)["error"]
    assert "bad JSON output: bench result has no 'command'" in run_all.run_one("garbage", out, True, 30)["error"]
    assert "timed out after 1 s" in run_all.run_one("slow", out, True, 1)["error"]


def test_discover_picks_up_new_benches_in_budget_order(tmp_path, monkeypatch):
    for name in ("common", "run_all", "gpu_step", "_helper", "zeta_new", "training_step", "data_pipeline"):
        (tmp_path / f"{name}.py").write_text("")
    monkeypatch.setattr(run_all, "BENCH_DIR", tmp_path)
    assert run_all.discover() == ["data_pipeline", "training_step", "zeta_new"]
    assert run_all.discover(["zeta_new"]) == ["zeta_new"]
    with pytest.raises(SystemExit, match="unknown bench\\(es\\) \\['nope'\\]"):
        run_all.discover(["nope"])


def test_every_bench_script_answers_help():
    """Started together (each is a fresh interpreter), so the check stays fast on 2 cores."""
    scripts = sorted(p for p in BENCH.glob("*.py") if p.name != "common.py")
    procs = {p.name: subprocess.Popen([sys.executable, "-W", "ignore", str(p), "--help"], cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in scripts}
    failed, helps = {}, {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        helps[name] = out
        if proc.returncode != 0 or "usage:" not in out:
            failed[name] = (err or out)[-400:]
    assert not failed, failed
    assert {"data_pipeline.py", "training_step.py", "run_all.py", "gpu_step.py"} <= set(procs)
    # every bench the suite runs takes the suite's arguments
    lacking = [n for n in set(procs) - {"run_all.py", "gpu_step.py"} if "--quick" not in helps[n] or "--json" not in helps[n]]
    assert not lacking, f"without --quick/--json: {lacking}"


@pytest.mark.slow
def test_gpu_script_code_path_runs_on_tiny_models_on_cpu(synthetic_root, tmp_path):
    """bench/gpu_step.py's ours-vs-HF training and generation code on the tiny models (no GPU here): the peer holds
    a copy of ours' weights (LoRA adapters included), so losses and captions agree."""
    import os

    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", str(BENCH / "gpu_step.py"), "--size", "tiny", "--device", "cpu",
         "--cases", "opt_lora,t5_qformer", "--steps", "1", "--runs", "1", "--warmup", "1", "--json", str(out)],
        cwd=REPO, env={**os.environ, "LAVIS_EXT_DATA": str(synthetic_root), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    payload = common.validate(json.loads(out.read_text()))
    rows = {r["what"]: r for r in payload["rows"]}
    training = [r for w, r in rows.items() if "training samples/s" in w]
    assert any("opt_lora" in w and "training samples/s" in w for w in rows)
    assert any("opt_lora" in w and "first call" in w for w in rows)  # the warm-up call is reported apart
    # the same weights on both sides: equal losses in fp32 (the ViT's last LayerNorm eps differs by 9e-6, see hf_bridge)
    assert len(training) == 2 and all("same weights, eval loss" in r["note"] and "DIFFERENT" not in r["note"] for r in training)
    generation = [r for w, r in rows.items() if "T5 tiny" in w and "batch 16" in w]
    assert generation and "same captions 16/16" in generation[0]["note"]
    assert payload["machine"]["gpu"] == "cpu"


def test_shown_command_drops_the_json_path():
    assert run_all.shown_command("python bench/x.py --quick --json /tmp/r/x.json --runs 3") == "python bench/x.py --quick --runs 3"


def test_a_narrow_miss_is_not_rounded_up_to_the_target():
    miss = common.row("x", "x/s", common.stat("o", [0.898]), common.stat("p", [1.0]), target=0.9)
    assert miss["met"] is False and run_all.ratio_text(miss) == "0.898x"
    assert run_all.ratio_text(common.row("y", "x/s", common.stat("o", [2.0]), common.stat("p", [1.0]), target=1.0)) == "2.00x"


def test_serving_bench_stops_a_server_together_with_what_it_forked(tmp_path):
    """LitServe's server forks and spawns workers that survived terminate() and loaded every later benchmark."""
    import os
    import subprocess
    import time

    serving = _load("serving")
    pid_file = tmp_path / "grandchild.pid"
    script = ("import os, signal, subprocess, sys, time\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
              "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)'])\n"
              f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
              "time.sleep(600)\n")
    server = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    serving.stop_groups([server], grace_s=2)
    assert server.poll() is not None
    time.sleep(0.2)
    try:
        os.kill(grandchild, 0)
        status = Path(f"/proc/{grandchild}/stat").read_text().rsplit(")", 1)[1].split()[0]
        assert status == "Z", f"the grandchild ({grandchild}) ignoring SIGTERM is still running"
    except ProcessLookupError:
        pass


def test_a_report_rewritten_from_saved_results_keeps_the_suites_date_load_and_wall_time(tmp_path):
    """--from-results re-renders what the last whole suite saved, its header figures included."""
    payload = common.write_json(None, "import_time", [common.row("import", "s", common.stat("o", [1.0]),
                                                               common.stat("p", [1.0]), higher_is_better=False)],
                                ["--quick"])
    (tmp_path / "import_time.json").write_text(json.dumps(payload))
    (tmp_path / run_all.SUITE_FILE).write_text(json.dumps({"date": "2026-01-02", "load": [1.25, 2.5], "quick": True,
                                                           "seconds": 840.0}))
    out = tmp_path / "B.md"
    run_all.main(["--from-results", str(tmp_path), "--out", str(out), "--demo-dir", str(tmp_path / "no_demo"),
                  "--demo-seeds-dir", str(tmp_path / "no_seeds")])
    text = out.read_text()
    assert "Date: 2026-01-02." in text
    assert "Load average (1 min) 1.2 at the start and 2.5 at the end" in text
    assert "Suite wall time: 14.0 min (--quick sizes)." in text
