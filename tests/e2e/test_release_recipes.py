"""Every recipe in projects/blip2 from release-shaped checkpoints (tests/release_fixture.py): LAVIS's URLs
resolved to the torch hub cache, the LLM and bert-base-uncased from the Hugging Face cache with
HF_HUB_OFFLINE=1, run through lavis_ext.cli (evaluate for evaluation recipes, as run_scripts/launch.sh does)
with only depth, data, output folder, device and batch size overridden (and the exceptions listed in
release_fixture.EXCEPTIONS; FlanT5-XXL's caption evaluations read caption_coco_ft's checkpoint, as their
headers say). Each run must load its release with no missing or unused tensor beyond the
ones the releases leave out by design (release_fixture.expected_load), take two optimizer steps when it
trains, and generate when its model generates.

Slow: real widths (ViT-g 1408, OPT 2560/4096, Flan-T5 2048/4096, real vocabularies) at depth 2 cost
0.5-2.5 minutes a recipe on 2 CPU cores; the artifacts of all four LLMs take about 8 GB of disk.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from release_fixture import LLM_REPOS, RECIPES, ReleaseArtifacts, check_run, run_in_subprocess

from lavis_ext.models.meta import recipe_files

RECIPE_FILES = [p.relative_to(RECIPES).as_posix() for p in recipe_files(RECIPES)]  # not the shared _base/ files


@pytest.fixture(scope="session")
def all_release_artifacts(tmp_path_factory) -> ReleaseArtifacts:
    return ReleaseArtifacts(tmp_path_factory.getbasetemp() / "release").ensure(tuple(LLM_REPOS))


#: run directories of the training recipes, for the evaluation recipes that read their checkpoint
_RUNS: dict[str, Path] = {}


def _env_for(rel: str) -> dict:
    """FlanT5-XXL had no COCO-fine-tuned release (LAVIS#585): its caption evaluations read the checkpoint
    of this folder's caption_coco_ft.yaml through BLIP2_FINETUNED, so that run (sorted first) feeds them."""
    if "BLIP2_FINETUNED" not in (RECIPES / rel).read_text():
        return {}
    source = f"{rel.split('/')[0]}/caption_coco_ft.yaml"
    if source not in _RUNS:
        pytest.skip(f"{rel} evaluates the checkpoint of {source}, which did not run in this session")
    return {"BLIP2_FINETUNED": str(_RUNS[source] / "checkpoint_best.safetensors")}


@pytest.mark.slow
@pytest.mark.parametrize("rel", RECIPE_FILES)
def test_recipe_runs_from_release_checkpoints(all_release_artifacts, tmp_path, rel):
    (run,) = run_in_subprocess(all_release_artifacts, [rel], tmp_path, timeout=1200, env=_env_for(rel))
    check_run(run)
    _RUNS[rel] = Path(run["run_dir"])
