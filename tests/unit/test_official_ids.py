"""Official COCO caption files as released: per-split image folders (train2014/, val2014/), and result files that
pycocotools' ``COCO.loadRes`` accepts (COCO's integer image ids, not our internal strings), through evaluate.py with
the tiny Flan-T5."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from lavis.common.registry import registry
from omegaconf import OmegaConf
from PIL import Image

from lavis_ext import cli

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="Java is needed for PTB tokenisation")
TRAIN_IDS = [9, 25]
VAL_IDS = [42, 73, 391895]


def _write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def _captions_file(path: Path, subset: str, ids: list[int]) -> Path:
    """A COCO caption file as released: file names without folder, integer ids, info/licenses/type."""
    images = [{"id": i, "file_name": f"COCO_{subset}_{i:012d}.jpg", "height": 32, "width": 40, "license": 1}
              for i in ids]
    anns = [{"id": 1000 * i + j, "image_id": i, "caption": f"a picture number {i} with {word}"}
            for i in ids for j, word in enumerate(["shapes", "colours"])]
    return _write(path, {"info": {"year": 2014}, "licenses": [], "type": "captions", "images": images,
                         "annotations": anns})


@pytest.fixture()
def coco(tmp_path) -> Path:
    """COCO 2014 in its own layout: images in train2014/ and val2014/, annotations/captions_*2014.json."""
    root = tmp_path / "coco"
    for subset, ids in (("train2014", TRAIN_IDS), ("val2014", VAL_IDS)):
        for n, i in enumerate(ids):
            path = root / subset / f"COCO_{subset}_{i:012d}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (40, 32), (40 * n % 255, 120, 200)).save(path)
        _captions_file(root / "annotations" / f"captions_{subset}.json", subset, ids)
    return root


def _info(root: Path, **extra) -> dict:
    info = {"root": str(root), "image_root": {"train": "train2014", "val": "val2014"},
            "annotations": {"train": "annotations/captions_train2014.json", "val": "annotations/captions_val2014.json"}}
    info.update(extra)
    return info


def _build(**build_info) -> dict:
    cls = registry.get_builder_class("coco_caption_file")
    cfg = OmegaConf.load(cls.DATASET_CONFIG_DICT["default"]).datasets["coco_caption_file"]
    cfg.build_info = OmegaConf.merge(cfg.build_info, build_info)
    return cls(cfg).build_datasets()


def test_coco_caption_file_takes_an_image_folder_per_split(coco):
    datasets = _build(**_info(coco))
    assert [e.path for e in datasets["train"].entries] == [
        str((coco / "train2014" / f"COCO_train2014_{i:012d}.jpg").resolve()) for i in TRAIN_IDS]
    assert [e.rel for e in datasets["val"].entries] == [f"COCO_val2014_{i:012d}.jpg" for i in VAL_IDS]
    assert datasets["val"][0]["image_id"] == "42"  # samples keep string ids, as every dataset's
    assert datasets["val"].source_ids["image_id"] == {str(i): i for i in VAL_IDS}
    # the single-folder form still works (file names relative to it)
    one = _build(**_info(coco, image_root="val2014", annotations={"val": "annotations/captions_val2014.json"}))
    assert [e.rel for e in one["val"].entries] == [f"COCO_val2014_{i:012d}.jpg" for i in VAL_IDS]


@pytest.mark.parametrize(
    "image_root, error, match",
    [
        ({"train": "train2014", "vall": "val2014"}, ValueError,
         r"image_root names split\(s\) \['vall'\] that are not in "
         r"datasets\.coco_caption_file\.build_info\.annotations; valid splits: train, val"),
        ({"train": "train2014"}, ValueError, r"image_root gives no folder for split\(s\) \['val'\]"),
        ({"train": "train2014", "val": "val2015"}, FileNotFoundError, r"image_root\.val '.*val2015' is not a folder"),
    ],
)
def test_a_bad_per_split_image_root_names_the_problem(coco, image_root, error, match):
    with pytest.raises(error, match=match):
        _build(**_info(coco, image_root=image_root))


@pytest.mark.parametrize("report_metric", [pytest.param(True, marks=needs_java), False])
def test_caption_result_file_is_accepted_by_pycocotools(synthetic_root, coco, tmp_path, report_metric):
    """evaluate.py on captions_val2014.json (per-split folders, no symlinks): the result file has COCO's integer image
    ids, so pycocotools loads it, whether the run scores it or not. With string ids: AssertionError: Results do not
    correspond to current coco set."""
    from pycocotools.coco import COCO

    project = {
        "model": {"arch": "blip2_t5_ext", "model_type": "tiny"},
        "datasets": {"coco_caption_file": {"build_info": _info(coco)}},
        "run": {"task": "captioning_ext", "runner": "runner_base", "test_splits": ["val"], "seed": 1,
                "output_dir": str(tmp_path / "runs")},
    }
    path = tmp_path / "caption.yaml"
    OmegaConf.save(OmegaConf.create(project), path)
    runner, _ = cli.evaluate(["--cfg-path", str(path), "--options", "run.batch_size_train=2", "run.batch_size_eval=2",
                              "run.num_workers=0", "run.num_beams=1", "run.max_len=4", "run.evaluate=true",
                              "run.device=cpu", "run.distributed=false", "run.amp=false",
                              f"run.report_metric={report_metric}", "run.constant_baseline=false"])
    result = Path(runner.output_dir) / "result" / "val_epochbest.json"
    rows = json.loads(result.read_text())
    assert [r["image_id"] for r in rows] == VAL_IDS and all(set(r) == {"image_id", "caption"} for r in rows)
    gt = COCO(str(coco / "annotations" / "captions_val2014.json"))
    loaded = gt.loadRes(str(result))
    assert sorted(loaded.getImgIds()) == sorted(VAL_IDS)
    assert {loaded.anns[a]["caption"] for a in loaded.getAnnIds()} == {r["caption"] for r in rows}
    if report_metric:
        metrics = json.loads((Path(runner.output_dir) / "val_epochbest_metrics.json").read_text())
        assert metrics["num_images"] == len(VAL_IDS) and "CIDEr" in metrics["metrics"]
