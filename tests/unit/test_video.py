"""Video captioning on a video written here with OpenCV: 3 scenes of 2 s at 5 fps (synthetic shapes
images drifting a pixel per frame), sampled by time, by frame count and by scene change."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from lavis_ext.apps import video

FPS, SCENE_FRAMES, SCENES, SIZE = 5, 10, 3, 64


@pytest.fixture(scope="module")
def caption_predictor(trained_caption_run):
    from lavis_ext.inference import load

    return load(trained_caption_run, device="cpu")


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """An MJPG .avi: scene k is synthetic test image k, shifted one pixel right per frame."""
    import cv2

    from lavis_ext.datasets.synthetic import make_example

    path = tmp_path_factory.mktemp("video") / "scenes.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (SIZE, SIZE))
    assert writer.isOpened()
    for scene in range(SCENES):
        rgb = np.asarray(Image.open(io.BytesIO(make_example(0, "test", scene)["jpg"])).convert("RGB").resize((SIZE, SIZE)))
        for step in range(SCENE_FRAMES):
            writer.write(cv2.cvtColor(np.roll(rgb, step, axis=1), cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def test_every_seconds_gives_timestamped_captions(caption_predictor, clip):
    result = video.caption_video(caption_predictor, clip, video.Sampling(every_seconds=1.0), batch_size=4)
    assert result["fps"] == FPS and result["frame_count"] == SCENES * SCENE_FRAMES
    assert result["duration"] == pytest.approx(6.0)
    cues = result["captions"]
    assert [c["frame"] for c in cues] == [0, 5, 10, 15, 20, 25]
    assert [c["start"] for c in cues] == pytest.approx([0, 1, 2, 3, 4, 5])
    assert [c["end"] for c in cues] == pytest.approx([1, 2, 3, 4, 5, 6])
    assert [c["index"] for c in cues] == [1, 2, 3, 4, 5, 6]
    assert all(isinstance(c["caption"], str) and c["caption"] for c in cues)
    # batching is invisible: one frame per call gives the same captions
    single = video.caption_video(caption_predictor, clip, video.Sampling(every_seconds=1.0), batch_size=1)
    assert [c["caption"] for c in single["captions"]] == [c["caption"] for c in cues]
    json.dumps(result)


def test_srt_is_valid_and_parses_back(caption_predictor, clip):
    import srt

    result = video.caption_video(caption_predictor, clip, video.Sampling(every_seconds=2.5), batch_size=8)
    text = video.to_srt(result)
    blocks = text.strip().split("\n\n")
    assert len(blocks) == 3
    first = blocks[0].splitlines()
    assert first[0] == "1" and first[1] == "00:00:00,000 --> 00:00:02,600"  # frame 13 = 2.6 s is the first >= 2.5 s
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d,\d{3} --> \d\d:\d\d:\d\d,\d{3}", b.splitlines()[1]) for b in blocks)
    parsed = list(srt.parse(text))
    assert [s.index for s in parsed] == [1, 2, 3]
    assert [s.start.total_seconds() for s in parsed] == pytest.approx([0.0, 2.6, 5.0])
    assert [s.end.total_seconds() for s in parsed] == pytest.approx([2.6, 5.0, 6.0])
    assert [s.content for s in parsed] == [c["caption"] for c in result["captions"]]


def test_every_frames_and_scene_changes(caption_predictor, clip):
    # measured on this clip: a cut moves 0.06-0.08 of the grey range (the scenes share a white background),
    # the one-pixel drift at most 0.013, so 0.04 separates them
    by_frames = video.caption_video(caption_predictor, clip, video.Sampling(every_frames=8))
    assert [c["frame"] for c in by_frames["captions"]] == [0, 8, 16, 24]
    scenes = video.caption_video(caption_predictor, clip, video.Sampling(scene_threshold=0.04))
    assert [c["frame"] for c in scenes["captions"]] == [0, SCENE_FRAMES, 2 * SCENE_FRAMES]  # the cuts, not the drift
    assert [c["reason"] for c in scenes["captions"]] == ["start", "scene", "scene"]
    assert [c["end"] for c in scenes["captions"]] == pytest.approx([2.0, 4.0, 6.0])


def test_cli_writes_json_and_srt(trained_caption_run, clip, tmp_path, capsys):
    out_json, out_srt = tmp_path / "out" / "captions.json", tmp_path / "out" / "captions.srt"
    rc = video.main(["--checkpoint", str(trained_caption_run), "--device", "cpu", str(clip), "--every-seconds", "2",
                     "--scene-threshold", "0.04", "--json", str(out_json), "--srt", str(out_srt)])
    assert rc == 0
    result = json.loads(out_json.read_text())
    # every 2 s and the cuts coincide here: frames 0, 10, 20, each picked by both rules
    assert [(c["frame"], c["reason"]) for c in result["captions"]] == [(0, "seconds+start"), (10, "seconds+scene"),
                                                                       (20, "seconds+scene")]
    assert out_srt.read_text().startswith("1\n00:00:00,000 --> 00:00:02,000\n")
    assert "00:04.000 - 00:06.000" in capsys.readouterr().out


def test_unreadable_and_empty_videos_fail_clearly(caption_predictor, tmp_path, capsys):
    import cv2

    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 20)
    with pytest.raises(video.VideoError, match="cannot open video .*garbage.mp4"):
        video.caption_video(caption_predictor, garbage, video.Sampling(every_seconds=1))
    empty = tmp_path / "empty.avi"
    cv2.VideoWriter(str(empty), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (SIZE, SIZE)).release()
    with pytest.raises(video.VideoError, match="holds no decodable frame"):
        video.caption_video(caption_predictor, empty, video.Sampling(every_seconds=1))
    with pytest.raises(video.VideoError, match="does not exist"):
        video.caption_video(caption_predictor, tmp_path / "missing.mp4", video.Sampling(every_seconds=1))
    with pytest.raises(ValueError, match="choose a sampling rule"):
        video.Sampling()
    with pytest.raises(ValueError, match="scene_threshold=2"):
        video.Sampling(scene_threshold=2)
    assert video.main(["--checkpoint", str(tmp_path), str(garbage), "--every-frames", "0"]) == 2
    assert "every_frames=0 must be an integer >= 1" in capsys.readouterr().err
