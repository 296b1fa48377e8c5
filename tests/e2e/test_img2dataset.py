"""img2dataset's webdataset output trains through train.py's path as it is: no conversion, no sizes file.

A local http server (127.0.0.1) serves synthetic images, two URLs that 404 and two that are not images;
img2dataset downloads them into shards (jpg + txt + json with a "caption" string, NNNNN_stats.json), and
the tiny BLIP-2 OPT trains on those shards for caption fine-tuning (captioning_ext) and for stage-2 style
generative pretraining (image_text_pretrain_ext). The split length comes from the stats files.
"""
from __future__ import annotations

import functools
import http.server
import json
import tarfile
import threading
from pathlib import Path

import pytest

from lavis_ext import cli
from tiny_models import QUICK, retask

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES = 32  # two steps of 16


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def img2dataset_shards(synthetic_root, tmp_path_factory) -> Path:
    img2dataset = pytest.importorskip("img2dataset", reason="the dev extra's img2dataset is not installed")
    import pandas as pd

    www = tmp_path_factory.mktemp("www")
    captions = []
    for shard in sorted((synthetic_root / "train").glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".json")):
                key = name[: -len(".json")]
                (www / f"{key}.jpg").write_bytes(tar.extractfile(members[f"{key}.jpg"]).read())
                captions.append((key, json.load(tar.extractfile(members[name]))["captions"][0]))
        if len(captions) >= NUM_IMAGES:
            break
    (www / "page.jpg").write_bytes(b"<html>not an image</html>")
    (www / "empty.png").write_bytes(b"")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    rows = [(f"{base}/{key}.jpg", caption) for key, caption in captions[:NUM_IMAGES]]
    rows[5:5] = [(f"{base}/gone.jpg", "a missing image"), (f"{base}/page.jpg", "not an image")]
    rows[20:20] = [(f"{base}/gone2.jpg", "another missing one"), (f"{base}/empty.png", "empty body")]
    urls = www / "urls.parquet"
    pd.DataFrame(rows, columns=["url", "caption"]).to_parquet(urls)
    out = tmp_path_factory.mktemp("img2dataset")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations would ask the network for updates
        try:
            img2dataset.download(
                url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
                output_format="webdataset", output_folder=str(out), image_size=64, resize_mode="border",
                processes_count=1, thread_count=4, number_sample_per_shard=12, timeout=5, retries=0,
                enable_wandb=False,
            )
        finally:
            server.shutdown()
            server.server_close()
    return out


def test_img2dataset_output_is_what_the_pipeline_expects(img2dataset_shards):
    tars = sorted(p.name for p in img2dataset_shards.glob("*.tar"))
    assert tars == ["00000.tar", "00001.tar", "00002.tar"]  # 36 URLs in shards of 12
    stats = [json.loads((img2dataset_shards / f"{t[:-4]}_stats.json").read_text()) for t in tars]
    assert sum(s["successes"] for s in stats) == NUM_IMAGES and sum(s["count"] for s in stats) == NUM_IMAGES + 4
    with tarfile.open(img2dataset_shards / "00000.tar") as tar:
        names = tar.getnames()
        meta = json.load(tar.extractfile(next(n for n in names if n.endswith(".json"))))
    assert {n.split(".", 1)[1] for n in names} == {"jpg", "txt", "json"}
    assert isinstance(meta["caption"], str) and "captions" not in meta  # what the pipeline reads now


@pytest.mark.parametrize("task", ["captioning_ext", "image_text_pretrain_ext"])
def test_train_on_img2dataset_shards_without_conversion(img2dataset_shards, tmp_path, task, caplog):
    options = [
        *QUICK, f"run.output_dir={tmp_path / 'run'}", "run.valid_splits=[]", "run.test_splits=[]",
        f"datasets.wds_caption.build_info.root={img2dataset_shards}",
        "datasets.wds_caption.build_info.shards.train='{00000..00002}.tar'",
        "datasets.wds_caption.on_bad_record=error",  # img2dataset left its failures out: nothing bad may remain
    ]
    project = REPO / "projects/tiny/caption_opt.yaml"
    if task != "captioning_ext":  # stage 2: the LM loss on the plain caption, no prompt (pretrain_stage2.yaml)
        options = [o for o in options if not o.startswith(("run.num_beams", "run.max_len"))]  # captioning's
        options += ["model.prompt=''", "datasets.wds_caption.text_processor.train.prompt=''"]
        project = retask(project, task, tmp_path)
    with caplog.at_level("WARNING", logger="lavis_ext.datasets.wds_pipeline"):
        runner = cli.train(["--cfg-path", str(project), "--options", *options])
    train = runner.datasets["train"]
    train = getattr(train, "datasets", [train])[0]  # LAVIS may wrap the split in a ChainDataset
    assert len(train) == NUM_IMAGES  # from the NNNNN_stats.json files: one caption per image
    assert len(runner.train_loader) == NUM_IMAGES // 16
    assert "the pass ended" not in caplog.text and not train.skipped
    run_dir = Path(runner.output_dir)
    log = [json.loads(line) for line in (run_dir / "log.txt").read_text().splitlines() if "train_loss" in line]
    losses = [float(r["train_loss"]) for r in log if "train_loss" in r]
    assert losses and all(0 < x < 20 for x in losses), log
    assert (run_dir / "checkpoint_best.safetensors").is_file() or (run_dir / "latest").is_file()
