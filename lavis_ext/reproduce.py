"""``lavis-ext reproduce`` (``make reproduce``): three claims of the BLIP-2 paper, in miniature, on the
synthetic world, over seeds, into one table, one CSV and one plot.

1. ``stage1`` (Figure 5): stage-2 OPT captioning initialised from a stage-1 Q-Former (ITC+ITM+ITG; its ViT
   and Q-Former, through ``model.pretrained``) against the same stage 2 from scratch; test CIDEr-D and the
   val CIDEr-D curve.
2. ``losses`` (Table 6's ablation): stage-1 losses ITC / ITC+ITM / ITC+ITM+ITG, image<->text R@1/R@5. The
   ITC+ITM+ITG runs are also ablation 1's stage 1.
3. ``llm``: the LLM frozen / LoRA / fully fine-tuned for VQA. A frozen tiny LLM is only meaningful once it has
   learnt something, so every arm starts from ablation 1's stage-1-then-stage-2 caption checkpoint (ViT,
   Q-Former and OPT) of the same seed; a fourth arm is the VQA recipe from scratch, the control that says
   whether the caption stage helped at all. Reported with trainable parameters and wall time.

Every arm is an existing tiny recipe plus ``--options`` (:data:`ARMS`), run through ``lavis_ext.cli.train``
(in-process with ``--jobs 1``, as subprocesses otherwise) in ``<out>/<ablation>/<arm>/seed<k>/run``, and
skipped when that folder already has test metrics; an interrupted arm continues from its last epoch
checkpoint (``run.resume=auto``). The tables come from :mod:`lavis_ext.report`'s functions with the arms as
groups (the logged configs cannot group them: the checkpoint paths differ per seed).

Why not a sweep tool: the arms depend on each other (stage 1 before stage 2 before VQA) and are few;
``--jobs 2`` starts an arm as soon as its inputs exist.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from lavis_ext import report

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
SIDE_FILE = "reproduce.json"  # per run: wall time, parameters, whether it was resumed

#: (what a unit of `lengths.train` is, the dataset key) per kind of arm.
KINDS = {
    "retrieval": ("projects/tiny/retrieval.yaml", "wds_caption"),
    "caption": ("projects/tiny/caption_opt.yaml", "wds_caption"),
    "vqa": ("projects/tiny/vqa_opt.yaml", "wds_vqa"),
}

#: ``--size``: seeds and the per-kind overrides that shorten the tiny recipes. ``full`` is `make reproduce`
#: (about 45-60 min on 2 cores with --jobs 2); ``micro`` exercises the whole pipeline in seconds (tests).
SIZES = {
    "full": {
        "seeds": (42, 43, 44),
        "retrieval": ["run.max_epoch=3", "run.val_freq=1", "train=6400"],   # 600 steps at batch 32
        "caption": ["run.max_epoch=5", "run.val_freq=1", "train=6400", "run.constant_baseline=false"],  # 2000 steps
        "vqa": ["run.max_epoch=3", "run.val_freq=1", "train=4800"],          # 900 steps at batch 16
    },
    "micro": {
        "seeds": (42,),
        "retrieval": ["run.max_epoch=1", "train=64", "run.num_workers=0", "run.warmup_steps=2"],
        "caption": ["run.max_epoch=1", "train=64", "run.num_workers=0", "run.warmup_steps=2", "run.max_len=6",
                    "run.constant_baseline=false"],
        "vqa": ["run.max_epoch=1", "train=64", "run.num_workers=0", "run.warmup_steps=2", "run.num_beams=1"],
    },
}


@dataclass(frozen=True)
class Arm:
    ablation: str
    name: str          # folder name
    label: str         # table row
    kind: str
    options: tuple = ()
    init_from: tuple | None = None   # (ablation, arm name): that arm's checkpoint of the same seed -> model.pretrained


LORA = ("model.freeze_llm=true", "model.lora_llm.r=16", "model.lora_llm.alpha=32")
ARMS = (
    Arm("losses", "itc", "ITC", "retrieval", ("run.losses=[itc]",)),
    Arm("losses", "itc_itm", "ITC+ITM", "retrieval", ("run.losses=[itc,itm]",)),
    Arm("losses", "itc_itm_itg", "ITC+ITM+ITG", "retrieval", ("run.losses=[itc,itm,itg]",)),
    Arm("stage1", "scratch", "stage 2 from scratch", "caption"),
    Arm("stage1", "from_stage1", "stage 1 (ITC+ITM+ITG), then stage 2", "caption", init_from=("losses", "itc_itm_itg")),
    Arm("llm", "frozen", "caption-trained LLM frozen", "vqa", ("model.freeze_llm=true",), ("stage1", "from_stage1")),
    Arm("llm", "lora", "caption-trained LLM + LoRA r16", "vqa", LORA, ("stage1", "from_stage1")),
    Arm("llm", "full", "caption-trained LLM fully fine-tuned", "vqa", ("model.freeze_llm=false",), ("stage1", "from_stage1")),
    # the VQA recipe's init_lr 3e-4 is for fine-tuning a caption checkpoint; from nothing the control trains at the
    # caption recipe's from-scratch LR
    Arm("llm", "scratch", "no caption stage: all from scratch (control)", "vqa",
        ("model.freeze_llm=false", "run.init_lr=1.5e-3", "run.min_lr=1e-4")),
)

#: per ablation: what it reproduces, its table's metrics and its plot's curves.
ABLATIONS = {
    "stage1": ("Stage-1 representation learning before stage 2 (paper Figure 5): test caption CIDEr-D",
               ["CIDEr", "Bleu_4", "METEOR", "ROUGE_L", "wall_min"], ["val/CIDEr", "train/loss"]),
    "losses": ("Stage-1 objectives (paper Table 6's ablation): test retrieval recall, image->text (txt_r) "
               "and text->image (img_r) with the protocol's ITM re-ranking, then by ITC alone (itc_*)",
               ["txt_r1", "txt_r5", "img_r1", "img_r5", "itc_txt_r1", "itc_txt_r5", "itc_img_r1", "itc_img_r5",
                "wall_min"],
               ["val/txt_r1", "val/img_r1", "train/loss"]),
    "llm": ("Frozen LLM vs LoRA vs full fine-tuning for VQA: test VQA accuracy (official), per question type, "
            "trainable parameters and wall time",
            ["overall", "color", "shape", "count", "relation", "trainable_k", "wall_min"],
            ["val/overall", "train/loss"]),
}


def run_dir(out: Path, arm: Arm, seed: int) -> Path:
    return out / arm.ablation / arm.name / f"seed{seed}" / "run"


def is_done(path: Path) -> bool:
    return any(path.glob("test_epoch*_metrics.json"))


def checkpoint_of(path: Path) -> Path:
    """The checkpoint a later stage starts from: the best validation epoch's, else the last one."""
    for name in ("checkpoint_best.safetensors", "latest"):
        candidate = path / name
        if candidate.is_file():
            return candidate.resolve() if name == "latest" else candidate
    raise FileNotFoundError(f"no checkpoint_best.safetensors or latest in {path}; did that arm finish?")


def shared_vision_options() -> list[str]:
    """The caption recipe's ViT shape, for every arm: stage 1 hands its ViT to stage 2 and stage 2 to VQA, so
    the three kinds must build the same tower (the retrieval recipe keeps the tiny default otherwise)."""
    from lavis_ext.project_files import load_project_yaml

    vit = load_project_yaml(REPO / KINDS["caption"][0]).model.get("vit_config") or {}
    return [f"model.vit_config.{key}={value}" for key, value in vit.items()]


def arm_argv(arm: Arm, seed: int, out: Path, size: str) -> list[str]:
    project, dataset = KINDS[arm.kind]
    options = shared_vision_options()
    for item in SIZES[size][arm.kind]:
        options.append(f"datasets.{dataset}.build_info.lengths.{item}" if item.startswith("train=") else item)
    options += list(arm.options)
    if arm.init_from:
        source = next(a for a in ARMS if (a.ablation, a.name) == arm.init_from)
        options += ["model.load_pretrained=true", f"model.pretrained={checkpoint_of(run_dir(out, source, seed))}"]
    target = run_dir(out, arm, seed)
    options += [f"run.seed={seed}", f"run.output_dir={target.parent}", f"run.job_id={target.name}", "run.resume=auto"]
    return ["--cfg-path", str(REPO / project), "--options", *options]


def _parameters(path: Path) -> dict:
    """(trainable, total) from the ``total`` row of the run's parameters.txt."""
    try:
        for line in (path / "parameters.txt").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] == "total":
                return {"trainable_params": int(fields[1].replace(",", "")), "total_params": int(fields[2].replace(",", ""))}
    except (OSError, ValueError, IndexError):
        pass
    return {}


def run_arm(arm: Arm, seed: int, out: Path, size: str, in_process: bool, threads: int) -> Path:
    """Train+test one arm for one seed (skipped when its test metrics exist); returns its run folder."""
    target = run_dir(out, arm, seed)
    if is_done(target):
        logger.info("reproduce: %s/%s seed %d already done, skipped", arm.ablation, arm.name, seed)
        return target
    resumed = target.is_dir() and any(target.glob("checkpoint_*.safetensors"))
    argv = arm_argv(arm, seed, out, size)
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("reproduce: %s/%s seed %d%s", arm.ablation, arm.name, seed, " (resuming)" if resumed else "")
    start = time.perf_counter()
    if in_process:
        from lavis_ext import cli

        cli.train(argv)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        code = "import sys; from lavis_ext import cli; cli.train(sys.argv[1:])"
        with open(target.parent / "stdout.log", "a") as log:
            done = subprocess.run([sys.executable, "-c", code, *argv], env=env, cwd=os.getcwd(), stdout=log,
                                  stderr=subprocess.STDOUT)
        if done.returncode != 0:
            raise RuntimeError(f"{arm.ablation}/{arm.name} seed {seed} failed (exit {done.returncode}); "
                               f"see {target.parent / 'stdout.log'}")
    wall = time.perf_counter() - start
    if not is_done(target):
        raise RuntimeError(f"{arm.ablation}/{arm.name} seed {seed} wrote no test metrics in {target}")
    side = {"wall_s": round(wall, 1), "resumed": resumed, "threads": threads, "size": size, **_parameters(target)}
    (target / SIDE_FILE).write_text(json.dumps(side, indent=1) + "\n")
    return target


def run_all(out: Path, size: str, seeds, ablations, jobs: int, threads: int) -> list[str]:
    """Every (arm, seed) of the chosen ablations plus the arms they start from, at most ``jobs`` at once,
    each as soon as the arm it is initialised from has finished. Returns the failures (the rest still runs)."""
    wanted = [a for a in ARMS if a.ablation in ablations]
    needed = list(wanted)
    for arm in wanted:  # an ablation's inputs come along (llm needs stage1's from_stage1, which needs losses')
        source = arm.init_from
        while source:
            dep = next(a for a in ARMS if (a.ablation, a.name) == source)
            if dep not in needed:
                needed.append(dep)
            source = dep.init_from
    sources = {arm.init_from for arm in ARMS}
    # seed by seed, so that a run cut short still has every arm for its first seeds; within a seed the chain
    # first (stage 1 -> stage 2 -> VQA), so the arms waiting on it start as early as they can
    order = sorted((a for a in ARMS if a in needed),
                   key=lambda a: 0 if (a.ablation, a.name) in sources else 1 if a.init_from else 2)
    tasks = [(arm, seed) for seed in seeds for arm in order]
    finished, failed, failures = set(), set(), []
    in_process = jobs == 1
    import torch

    threads_before = torch.get_num_threads()
    if in_process:  # the arms run here, in this thread (torch's thread count is per calling thread)
        torch.set_num_threads(threads)
    pool = None if in_process else ThreadPoolExecutor(max_workers=jobs)
    running, pending = {}, list(tasks)
    try:
        while pending or running:
            for arm, seed in list(pending):
                dep = arm.init_from and (*arm.init_from, seed)
                if dep and dep in failed:
                    pending.remove((arm, seed))
                    failed.add((arm.ablation, arm.name, seed))
                    failures.append(f"{arm.ablation}/{arm.name} seed {seed}: skipped, its input {dep} failed")
                elif (not dep or dep in finished) and len(running) < jobs:
                    pending.remove((arm, seed))
                    args = (arm, seed, out, size, in_process, threads)
                    running[pool.submit(run_arm, *args) if pool else _Done(run_arm, *args)] = (arm, seed)
            if not running:
                break
            done = [f for f in running if isinstance(f, _Done)] or wait(running, return_when=FIRST_COMPLETED)[0]
            for future in done:
                arm, seed = running.pop(future)
                try:
                    future.result()
                    finished.add((arm.ablation, arm.name, seed))
                except Exception as error:  # noqa: BLE001 -- one failed arm must not lose the others
                    logger.error("reproduce: %s", error)
                    failed.add((arm.ablation, arm.name, seed))
                    failures.append(f"{arm.ablation}/{arm.name} seed {seed}: {error}")
    finally:
        if pool:
            pool.shutdown(wait=True)
        torch.set_num_threads(threads_before)
    return failures


class _Done:
    """A call made now, in this thread, shaped like a finished future (``--jobs 1``)."""

    def __init__(self, fn, *args):
        try:
            self._value, self._error = fn(*args), None
        except Exception as error:  # noqa: BLE001 -- re-raised by result(), as a future does
            self._value, self._error = None, error

    def result(self):
        if self._error is not None:
            raise self._error
        return self._value


ITC_ONLY_FILE = "itc_only_test.json"


def itc_only_recall(run: Path) -> dict:
    """Test recall of a finished retrieval run ranked by ITC similarity alone (no ITM re-ranking), cached in
    the run folder as ``itc_only_test.json``.

    Why: the protocol re-ranks ITC's top k with ITM + ITC, and an ITC-only model's ITM head never trained
    (its loss weight is 0), so its protocol numbers carry a random head's noise; this column compares the
    three objectives on the one ranking they all train. The retrieval task's own encoder and metric
    functions do the work, on the run's best checkpoint (``lavis_ext.cli.evaluate``'s loader).
    """
    cached = run / ITC_ONLY_FILE
    if cached.is_file():
        return json.loads(cached.read_text())
    import torch

    from lavis_ext import cli
    from lavis_ext import dist as ext_dist
    from lavis_ext.evaluation.retrieval import index_captions, retrieval_metrics
    from lavis_ext.tasks.retrieval import itc_similarity, merge_shares

    def score(runner):
        model = runner.unwrap_dist_model(runner.model)
        model.eval()
        with torch.no_grad():
            records, _ = runner.task._encode_share(model, runner.dataloaders["test"], runner.device)
        _, ordered = merge_shares(ext_dist.all_gather_object(records))
        _, img2txt, txt2img = index_captions([r["captions"] for r in ordered])
        sims = itc_similarity(torch.stack([r["image_feat"] for r in ordered]), torch.cat([r["text_feat"] for r in ordered]))
        return retrieval_metrics(sims, sims.t(), img2txt, txt2img)

    argv = ["--cfg-path", str(REPO / KINDS["retrieval"][0]), "--checkpoint", str(run), "--options",
            f"run.output_dir={run / 'itc_only'}", "run.job_id=eval", "run.valid_splits=[]", "run.num_workers=0",
            *shared_vision_options()]
    _, metrics = cli._run(argv, "ITC-only retrieval", score, checkpoint=True)
    metrics = {f"itc_{k}": v for k, v in metrics.items() if k.startswith(("txt_r", "img_r"))}
    cached.write_text(json.dumps(metrics, indent=1) + "\n")
    return metrics


def load_groups(out: Path, ablation: str) -> dict[str, list[report.Run]]:
    """The finished runs of one ablation as report groups (one per arm), with the wall time, parameter counts
    and per-question-type accuracies added to each run's metrics."""
    groups: dict[str, list[report.Run]] = {}
    for arm in (a for a in ARMS if a.ablation == ablation):
        runs = []
        for seed_dir in sorted((out / arm.ablation / arm.name).glob("seed*/run")):
            if not is_done(seed_dir):
                continue
            run = report.load_run(seed_dir, "test")
            run.group = arm.label
            side_file = seed_dir / SIDE_FILE
            side = json.loads(side_file.read_text()) if side_file.is_file() else {}
            if "wall_s" in side:
                run.metrics["wall_min"] = side["wall_s"] / 60
            if "trainable_params" in side:  # thousands: the table's 4 significant digits stay readable
                run.metrics["trainable_k"] = side["trainable_params"] / 1000
            record = json.loads(report._metrics_file(seed_dir, "test").read_text())
            run.metrics.update(record.get("metrics", {}).get("per_question_type", {}))
            if arm.kind == "retrieval":
                run.metrics.update(itc_only_recall(seed_dir))
            runs.append(run)
        if runs:
            groups[arm.label] = runs
    return groups


def write_results(out: Path, ablations) -> dict[str, Path]:
    """results.md (a table per ablation), results.csv (every ablation's runs and mean/std rows, the union
    of their columns) and results.png (each ablation's curves, one panel row per ablation)."""
    sections, plots, every_group, every_metric = [], [], {}, []
    for name in ablations:
        title, metrics, curves = ABLATIONS[name]
        groups = load_groups(out, name)
        if not groups:
            sections.append(f"## {name}: {title}\n\nno finished runs yet\n")
            continue
        present = {m for runs in groups.values() for r in runs for m in r.metrics}
        metrics = [m for m in metrics if m in present]
        sections.append(f"## {name}: {title}\n\n" + report.markdown_table(groups, metrics, "test"))
        every_group.update({f"{name}: {label}": runs for label, runs in groups.items()})
        every_metric += [m for m in metrics if m not in every_metric]
        try:
            plots.append(report.plot_curves(groups, out / f"curves_{name}.png", [c for c in curves if _has_curve(groups, c)]))
        except (FileNotFoundError, KeyError) as error:
            logger.warning("reproduce: no curves for %s: %s", name, error)
    md = out / "results.md"
    md.write_text("# BLIP-2's ablations in miniature (lavis-ext reproduce)\n\n" + "\n".join(sections))
    paths = {"markdown": md}
    if every_group:
        paths["csv"] = out / "results.csv"
        paths["csv"].write_text(report.csv_table(every_group, every_metric))
    if plots:
        paths["plot"] = _stack(plots, out / "results.png")
    return paths


def _has_curve(groups, tag: str) -> bool:
    return any(tag in report.read_scalars(r.path) for runs in groups.values() for r in runs)


def _stack(images: list[Path], path: Path) -> Path:
    """The per-ablation curve figures one under the other, in one PNG."""
    from PIL import Image

    opened = [Image.open(p).convert("RGB") for p in images]
    width = max(i.width for i in opened)
    canvas = Image.new("RGB", (width, sum(i.height for i in opened)), "white")
    y = 0
    for image in opened:
        canvas.paste(image, (0, y))
        y += image.height
    canvas.save(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lavis-ext reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/reproduce", help="output folder (default runs/reproduce)")
    parser.add_argument("--size", default="full", choices=sorted(SIZES), help="full (make reproduce) or micro (tests)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="default: the size's seeds (42 43 44)")
    parser.add_argument("--ablations", nargs="+", default=list(ABLATIONS), choices=list(ABLATIONS),
                        help="which ablations (their input arms run too); default all")
    parser.add_argument("--jobs", type=int, default=1, help="arms at once; 1 runs in this process (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per arm (default 1)")
    parser.add_argument("--report-only", action="store_true", help="only aggregate the runs already there")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs {args.jobs} / --threads {args.threads}: both must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    failures = []
    if not args.report_only:
        start = time.perf_counter()
        failures = run_all(out, args.size, tuple(args.seeds or SIZES[args.size]["seeds"]), args.ablations,
                           args.jobs, args.threads)
        logger.info("reproduce: arms took %.1f min", (time.perf_counter() - start) / 60)
    paths = write_results(out, args.ablations)
    print(paths["markdown"].read_text(), end="")
    print("written: " + ", ".join(str(p) for p in paths.values()))
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
