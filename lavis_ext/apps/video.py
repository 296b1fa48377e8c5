"""Video captioning: sample frames, caption them in batches, write timestamped JSON and SRT subtitles.

Sampling (any combination; a frame is kept when one rule picks it):
* every N seconds (``every_seconds``): the first frame at or after 0, N, 2N, ... seconds;
* every N frames (``every_frames``): frames 0, N, 2N, ...;
* scene changes (``scene_threshold``): the first frame, then every frame whose downscaled grey image
  differs from the previous frame's by more than the threshold (mean absolute difference, 0..1).
  Cheap and dependency-free; a cut between two unrelated shots moves most pixels, a pan or a fade
  moves few per frame, so a threshold separates them. Tune it on your footage: scenes that share a
  background differ less (the test clip's cuts measure 0.06-0.08, its one-pixel drift at most 0.013).

Frames are decoded once, in order, by OpenCV (``cv2.VideoCapture``); kept frames are captioned by
``predictor.caption`` ``batch_size`` at a time, so memory stays flat for long videos. A cue lasts from its
frame's timestamp to the next kept frame's (the last one to the end of the video).

CLI: ``lavis-ext video --checkpoint RUN_DIR VIDEO --every-seconds 2 --json out.json --srt out.srt``.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from lavis_ext import inference

SCENE_SIZE = (32, 32)  # downscale before differencing: ignores noise and compression artefacts, and is fast


class VideoError(ValueError):
    """A video that cannot be opened or holds no decodable frame."""


@dataclass(frozen=True)
class Sampling:
    """Which frames to caption; at least one rule must be set."""

    every_seconds: float | None = None
    every_frames: int | None = None
    scene_threshold: float | None = None

    def __post_init__(self):
        if self.every_seconds is None and self.every_frames is None and self.scene_threshold is None:
            raise ValueError("choose a sampling rule: every_seconds, every_frames and/or scene_threshold")
        if self.every_seconds is not None and not self.every_seconds > 0:
            raise ValueError(f"every_seconds={self.every_seconds!r} must be > 0")
        if self.every_frames is not None and (int(self.every_frames) != self.every_frames or self.every_frames < 1):
            raise ValueError(f"every_frames={self.every_frames!r} must be an integer >= 1")
        if self.scene_threshold is not None and not 0 < self.scene_threshold < 1:
            raise ValueError(f"scene_threshold={self.scene_threshold!r} must be in (0, 1), e.g. 0.2")


def scene_signature(frame_bgr: np.ndarray) -> np.ndarray:
    """A frame reduced to what scene-change detection compares: small, grey, float in [0, 1]."""
    import cv2

    grey = cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2GRAY)
    return cv2.resize(grey, SCENE_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def sample_frames(path: str | Path, sampling: Sampling):
    """Yield ``(frame_index, seconds, rgb_array, reason)`` for the kept frames, then return the video info.

    The generator's return value (``StopIteration.value``) is ``{"fps", "frame_count", "duration"}``
    measured while decoding (container headers are often wrong about the frame count).

    Raises:
        VideoError: the file is missing, cannot be opened, or holds no decodable frame.
    """
    import cv2

    path = Path(path)
    if not path.is_file():
        raise VideoError(f"video {str(path)!r} does not exist")
    capture = cv2.VideoCapture(str(path))
    try:
        if not capture.isOpened():
            raise VideoError(
                f"cannot open video {str(path)!r}: not a video OpenCV can decode (corrupt file or unsupported "
                "container/codec); convert it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4"
            )
        fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
        if not fps > 0 or not np.isfinite(fps):
            raise VideoError(f"video {str(path)!r} reports no frame rate ({fps}); re-encode it with a fixed rate")
        index, next_time, previous = 0, 0.0, None
        while capture.grab():  # grab() only demuxes/decodes; retrieve() converts pixels, for frames we use
            seconds = index / fps
            reasons = []
            if sampling.every_frames is not None and index % int(sampling.every_frames) == 0:
                reasons.append("frames")
            if sampling.every_seconds is not None and seconds + 1e-9 >= next_time:
                reasons.append("seconds")
                while next_time <= seconds + 1e-9:
                    next_time += sampling.every_seconds
            if not reasons and sampling.scene_threshold is None:
                index += 1
                continue
            ok, frame = capture.retrieve()
            if not ok or frame is None:
                break
            if sampling.scene_threshold is not None:
                signature = scene_signature(frame)
                if previous is None:
                    reasons.append("start")
                elif float(np.abs(signature - previous).mean()) > sampling.scene_threshold:
                    reasons.append("scene")
                previous = signature
            if reasons:
                yield index, seconds, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), "+".join(reasons)
            index += 1
    finally:
        capture.release()
    if index == 0:
        raise VideoError(f"video {str(path)!r} holds no decodable frame (empty or truncated file)")
    return {"fps": fps, "frame_count": index, "duration": index / fps}


def caption_video(predictor, path: str | Path, sampling: Sampling, batch_size: int = 8, decoding=None,
                  prompt: str | None = None) -> dict:
    """Caption the sampled frames of a video.

    Returns:
        ``{"video", "fps", "frame_count", "duration", "sampling", "model", "captions": [{"index", "frame",
        "start", "end", "reason", "caption"}]}`` with times in seconds.
    Raises:
        VideoError: see :func:`sample_frames`. ValueError: ``batch_size`` < 1.
    """
    from PIL import Image

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    captions: list[dict] = []
    pending: list[tuple[int, float, str, Image.Image]] = []

    def flush():
        texts = predictor.caption([image for *_, image in pending], prompt=prompt, decoding=decoding)
        for (frame, seconds, reason, _), text in zip(pending, texts):
            captions.append({"index": len(captions) + 1, "frame": frame, "start": seconds, "end": None,
                             "reason": reason, "caption": text.strip()})
        pending.clear()

    frames = sample_frames(path, sampling)
    while True:
        try:
            frame, seconds, rgb, reason = next(frames)
        except StopIteration as stop:
            info = stop.value
            break
        pending.append((frame, seconds, reason, Image.fromarray(rgb)))
        if len(pending) >= batch_size:
            flush()
    if pending:
        flush()
    for cue, following in zip(captions, captions[1:] + [None]):
        cue["end"] = following["start"] if following else info["duration"]
    return {
        "video": str(path),
        **info,
        "sampling": {k: v for k, v in vars(sampling).items() if v is not None},
        "model": {"source": predictor.source, "arch": predictor.arch},
        "captions": captions,
    }


def to_srt(result: dict) -> str:
    """The captions as SubRip subtitles (numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``)."""
    import srt

    cues = [
        srt.Subtitle(index=c["index"], start=timedelta(seconds=c["start"]), end=timedelta(seconds=c["end"]),
                     content=c["caption"] or "...")
        for c in result["captions"]
    ]
    return srt.compose(cues, reindex=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lavis-ext video", description="Timestamped captions of a video (JSON, SRT).")
    inference.add_source_arguments(parser)
    parser.add_argument("video", help="the video file (anything OpenCV decodes: mp4, avi, mkv, ...)")
    parser.add_argument("--every-seconds", type=float, default=None, help="caption a frame every N seconds (the default, N=2, when no rule is given)")
    parser.add_argument("--every-frames", type=int, default=None, help="caption every N-th frame")
    parser.add_argument("--scene-threshold", type=float, default=None,
                        help="also caption the first frame of each new scene (mean grey difference, e.g. 0.2)")
    parser.add_argument("--batch-size", type=int, default=8, help="frames captioned per model call")
    parser.add_argument("--num-beams", type=int, default=None, help="beam count (default: the run's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="caption length limit (default: the run's)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the captions as JSON here")
    parser.add_argument("--srt", dest="srt_out", default=None, help="write SRT subtitles here")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.every_seconds is None and args.every_frames is None and args.scene_threshold is None:
        args.every_seconds = 2.0
    try:
        sampling = Sampling(args.every_seconds, args.every_frames, args.scene_threshold)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    predictor = inference.load_from_args(args)
    try:
        decoding = predictor.caption_decoding.with_options(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
        result = caption_video(predictor, args.video, sampling, batch_size=args.batch_size, decoding=decoding)
    except ValueError as exc:  # VideoError included
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for cue in result["captions"]:
        print(f"{_clock(cue['start'])} - {_clock(cue['end'])}  {cue['caption']}")
    for out, text in ((args.json_out, json.dumps(result, indent=2) + "\n"), (args.srt_out, to_srt(result) if args.srt_out else "")):
        if out:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
            Path(out).write_text(text, encoding="utf-8")
            print(f"wrote {out}")
    return 0


def _clock(seconds: float) -> str:
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes):02d}:{secs:06.3f}"


if __name__ == "__main__":
    sys.exit(main())
