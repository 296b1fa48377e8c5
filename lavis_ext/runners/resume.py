"""Which checkpoint a run continues from, and under which job id (`run.resume`, `run.job_id`)."""
from __future__ import annotations

import datetime
import logging
from pathlib import Path

from lavis.common.dist_utils import is_main_process

from lavis_ext import dist as ext_dist
from lavis_ext.checkpoints import first_valid, resume_candidates

logger = logging.getLogger(__name__)


def find_auto_resume(output_root, job_id: str | None = None) -> tuple[Path | None, list[str]]:
    """The checkpoint ``run.resume: auto`` continues from: in ``<output_root>/<job_id>`` when a job id
    is fixed, else in the run folders under ``output_root`` newest first (by their ``latest`` pointer or
    newest checkpoint). Within a folder the ``latest`` target comes first, then the others by progress;
    a file that fails its checksum is skipped in favour of the previous one. Returns (path or None,
    messages about the files skipped)."""
    root = Path(output_root).expanduser().resolve()
    if job_id:
        folders = [root / str(job_id)]
    elif root.is_dir():
        def newest(folder: Path) -> float:
            files = [folder / "latest", *folder.glob("checkpoint_*.safetensors")]
            return max((f.stat().st_mtime for f in files if f.is_file()), default=-1.0)

        folders = sorted((p for p in root.iterdir() if p.is_dir() and newest(p) >= 0), key=newest, reverse=True)
    else:
        folders = []
    messages: list[str] = []
    for folder in folders:
        if not folder.is_dir():
            continue
        path, skipped = first_valid(resume_candidates(folder))
        messages += skipped
        if path is not None:
            return path, messages
    return None, messages


def prepare_resume(run_cfg) -> tuple[str, str | None]:
    """(job id, checkpoint to resume from), decided on rank 0 and the same on every rank.

    ``run.job_id`` fixes the run folder name (default: the start time). ``run.resume: auto`` reuses the
    folder of the checkpoint it finds, so a run restarted again and again keeps one folder and one
    ``latest``. An explicit ``run.resume_ckpt_path`` wins over ``auto``."""
    job_id, path = run_cfg.get("job_id"), None
    if is_main_process():
        job_id = str(job_id or datetime.datetime.now().strftime("%Y%m%d%H%M%S"))
        explicit = run_cfg.get("resume_ckpt_path")
        mode = str(run_cfg.get("resume", "") or "").lower()
        if mode not in ("", "none", "false", "auto"):
            raise ValueError(f"run.resume {run_cfg.get('resume')!r}: use auto (or set run.resume_ckpt_path)")
        if explicit:
            path = str(explicit)
        elif mode == "auto":
            found, skipped = find_auto_resume(run_cfg.output_dir, run_cfg.get("job_id"))
            for message in skipped:
                logger.warning("resume: skipping corrupt checkpoint %s", message)
            if found is None:
                logger.info("run.resume=auto: no checkpoint under %s, starting a new run", run_cfg.output_dir)
            else:
                path, job_id = str(found), found.parent.name
                logger.info("run.resume=auto: continuing %s", found)
    job_id, path = ext_dist.broadcast_object((job_id, path))
    return job_id, path
