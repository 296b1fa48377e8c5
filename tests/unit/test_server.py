"""The HTTP server, for real: uvicorn on a free loopback port, driven with httpx, serving the tiny trained model.

Checks that answers equal the predictor's own for the same image, that every kind of bad upload gets its
status and JSON error while a concurrent good request still succeeds, that concurrent requests share
forward passes, that the API key is enforced, and that the server binds 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import asyncio
import io
import threading
import time

import httpx
import pytest
from PIL import Image, ImageDraw, ImageFile

from lavis_ext.serve.server import (
    ServerSettings,
    build_parser,
    build_server,
    create_app,
    settings_from_args,
)
from lavis_ext.serve.uploads import UploadError, UploadLimits, validate_image_bytes


# ---- helpers ----------------------------------------------------------------------------------------
def shape_image(seed: int, size: int = 64) -> Image.Image:
    """A coloured shape on a plain background, in the spirit of the synthetic training data."""
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    image = Image.new("RGB", (size, size), "white" if seed % 2 else "gray")
    draw = ImageDraw.Draw(image)
    box = (8 + seed % 5, 8 + seed % 7, size - 10, size - 12)
    (draw.ellipse if seed % 3 else draw.rectangle)(box, fill=colours[seed % len(colours)])
    return image


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


class LiveServer:
    """A ``uvicorn.Server`` running in a thread; its port is read back from the bound socket (port 0)."""

    def __init__(self, server):
        self.server = server
        self.thread = threading.Thread(target=server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.host, self.url = host, f"http://{host}:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)


def uvicorn_server(app):
    import uvicorn

    return uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))


LIMITS = ["--max-files", "3", "--max-bytes", "200000", "--max-pixels", "1000000"]


@pytest.fixture(scope="module")
def live(trained_caption_run):
    """The caption server started through the real `lavis-ext serve` path (no --host given)."""
    server = build_server(["--checkpoint", str(trained_caption_run), "--device", "cpu", "--port", "0",
                           "--max-wait-ms", "150", "--log-level", "warning", *LIMITS])
    with LiveServer(server) as running:
        running.predictor = server.config.app.state.predictor
        yield running


# ---- uploads (no server needed) ---------------------------------------------------------------------
def test_validator_detects_truncation_even_though_lavis_sets_load_truncated_images():
    import lavis_ext
    lavis_ext.register()  # imports LAVIS, which sets ImageFile.LOAD_TRUNCATED_IMAGES = True

    data = png(Image.effect_noise((96, 96), 60).convert("RGB"))
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(UploadError) as err:
        validate_image_bytes(data[: len(data) // 2])
    assert (err.value.status, err.value.code) == (400, "corrupt_image")
    assert ImageFile.LOAD_TRUNCATED_IMAGES == before  # PIL's global is restored
    image = validate_image_bytes(encoded(Image.new("P", (5, 4)), "GIF"))
    assert image.mode == "RGB" and image.size == (5, 4)
    with pytest.raises(ValueError, match="max_files"):
        UploadLimits(max_files=0)


def sixteen_bit(size: int = 64) -> Image.Image:
    """A 16-bit grey image (``I;16``): a horizontal ramp over the full 0..65535 range, a square at 20000."""
    import numpy as np

    values = np.tile(np.linspace(0, 65535, size).round().astype(np.uint16), (size, 1))
    values[16:48, 16:48] = 20000
    return Image.fromarray(values)


def test_sixteen_bit_png_and_tiff_are_scaled_to_eight_bits_not_refused():
    import numpy as np

    source = sixteen_bit()
    assert source.mode == "I;16"
    expected = np.rint(np.asarray(source, dtype=np.float64) / 257).astype(np.uint8)  # 65535 -> 255, 20000 -> 78
    for fmt in ("PNG", "TIFF"):
        image = validate_image_bytes(encoded(source, fmt), filename=f"scan.{fmt.lower()}")
        assert image.mode == "RGB", fmt
        pixels = np.asarray(image)
        assert (pixels == expected[..., None]).all(), fmt  # PIL's own convert("RGB") would clip all but the darkest to 255
    as_int32 = Image.fromarray(np.asarray(source, dtype=np.int32))  # mode "I", what some TIFF writers give
    assert (np.asarray(validate_image_bytes(encoded(as_int32, "TIFF"))) == expected[..., None]).all()


# ---- the live server --------------------------------------------------------------------------------
def test_binds_loopback_by_default_and_reports_health(live):
    assert live.host == "127.0.0.1"
    assert build_parser().parse_args(["--checkpoint", "x"]).host == "127.0.0.1"
    assert ServerSettings().host == "127.0.0.1"
    with httpx.Client(base_url=live.url) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert client.get("/docs").status_code == 200
        paths = client.get("/openapi.json").json()["paths"]
        assert {"/v1/caption", "/v1/vqa", "/v1/batch/caption", "/v1/batch/vqa", "/healthz", "/readyz"} <= set(paths)
        info = client.get("/v1/model").json()
        assert info["arch"] == live.predictor.arch and info["upload_limits"]["max_files"] == 3


def test_caption_equals_predictor_for_the_same_image(live):
    predictor = live.predictor
    beams2 = predictor.caption_decoding.with_options(num_beams=2, max_new_tokens=6)
    with httpx.Client(base_url=live.url, timeout=60) as client:
        for seed in range(2):
            image = shape_image(seed)
            reply = client.post("/v1/caption", files={"image": ("shape.png", png(image), "image/png")})
            assert reply.status_code == 200, reply.text
            assert reply.json() == {"caption": predictor.caption([image])[0]}
        image = shape_image(5)
        reply = client.post("/v1/caption", files={"image": ("s.png", png(image), "image/png")},
                            data={"prompt": "a picture of", "num_beams": "2", "max_new_tokens": "6"})
        assert reply.status_code == 200, reply.text
        assert reply.json()["caption"] == predictor.caption([image], prompt="a picture of", decoding=beams2)[0]
        # a 16-bit PNG (I;16) is captioned as its 8-bit scaling, not refused (415) nor clipped to white
        scan = sixteen_bit()
        reply = client.post("/v1/caption", files={"image": ("scan.png", png(scan), "image/png")})
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"caption": predictor.caption([validate_image_bytes(png(scan))])[0]}
        # the batch endpoint: one caption per file, in upload order, as the predictor gives them
        batch = [shape_image(seed) for seed in (1, 2, 3)]
        reply = client.post("/v1/batch/caption",
                            files=[("images", (f"{i}.png", png(im), "image/png")) for i, im in enumerate(batch)])
        assert reply.status_code == 200, reply.text
        captions = reply.json()["captions"]
        assert [c["filename"] for c in captions] == ["0.png", "1.png", "2.png"]
        assert all(isinstance(c["caption"], str) and c["caption"] for c in captions)


def test_concurrent_requests_share_forward_passes(live):
    images = [shape_image(seed) for seed in range(10)]

    async def drive():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            before = (await client.get("/stats")).json()
            replies = await asyncio.gather(*(
                client.post("/v1/caption", files={"image": (f"{i}.png", png(im), "image/png")})
                for i, im in enumerate(images)))
            after = (await client.get("/stats")).json()
            return before, replies, after

    before, replies, after = asyncio.run(drive())
    assert [r.status_code for r in replies] == [200] * len(images)
    assert all(r.json()["caption"] for r in replies)
    assert after["jobs"] - before["jobs"] == len(images)
    batches = after["batches"] - before["batches"]
    assert batches < len(images), after  # some requests shared a generate call
    assert after["max_batch_size"] > 1
    assert after["model_cpu_s"] > before["model_cpu_s"] and after["model_cpu_ms_per_job"] > 0  # the model's share
    # the same images one by one through the predictor: batching with left padding keeps the answers
    expected = [live.predictor.caption([im])[0] for im in images]
    assert [r.json()["caption"] for r in replies] == expected


def test_bad_uploads_are_rejected_while_a_concurrent_good_request_succeeds(live):
    good = png(shape_image(4))
    truncated_source = png(Image.effect_noise((96, 96), 60).convert("RGB"))
    noisy_large = png(Image.effect_noise((300, 300), 80).convert("RGB"))
    assert len(noisy_large) > 200000
    one = lambda data, name="x.png": {"image": (name, data, "application/octet-stream")}
    cases = {
        "empty": ("/v1/caption", one(b""), {}, 400, "empty_file"),
        "not an image": ("/v1/caption", one(b"%PDF-1.4 definitely not pixels", "a.pdf"), {}, 415, "not_an_image"),
        "truncated": ("/v1/caption", one(truncated_source[: len(truncated_source) // 2]), {}, 400, "corrupt_image"),
        "too many bytes": ("/v1/caption", one(noisy_large), {}, 413, "file_too_large"),
        "too many pixels": ("/v1/caption", one(png(Image.new("L", (1200, 1000)))), {}, 413, "too_many_pixels"),
        "bomb": ("/v1/caption", one(png(Image.new("1", (20000, 20000)))), {}, 413, "too_many_pixels"),
        "unsupported mode": ("/v1/caption", one(encoded(Image.new("LAB", (32, 32)), "TIFF"), "lab.tif"), {}, 415,
                             "unsupported_mode"),
        "unsupported format": ("/v1/caption", one(encoded(Image.new("RGB", (16, 16)), "ICO")), {}, 415,
                               "unsupported_format"),
        "too many files": ("/v1/batch/caption", [("images", (f"{i}.png", good, "image/png")) for i in range(4)], {},
                           413, "too_many_files"),
        "body too large": ("/v1/caption", one(good), {"padding": "x" * 1_700_000}, 413, "request_too_large"),
        "no file": ("/v1/caption", None, {"prompt": "a"}, 422, "invalid_request"),
        "bad decoding": ("/v1/caption", one(good), {"num_beams": "50"}, 422, "invalid_decoding"),
        "vqa without question": ("/v1/vqa", one(good), {"question": "  "}, 422, "invalid_request"),
    }

    async def drive():
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as client:
            async def post(path, files, data):
                return await client.post(path, files=files, data=data)

            async def streamed():  # no Content-Length: the limit is enforced while the body streams in
                yield b'--xx\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
                for _ in range(30):
                    yield bytes(65536)
                yield b"\r\n--xx--\r\n"

            good_calls = [post("/v1/caption", one(good), {}) for _ in range(2)]
            bad_calls = [post(path, files, data) for path, files, data, _, _ in cases.values()]
            chunked = client.post("/v1/caption", content=streamed(),
                                  headers={"content-type": "multipart/form-data; boundary=xx"})
            replies = await asyncio.gather(*good_calls, *bad_calls, chunked, return_exceptions=True)
            after = await client.get("/readyz")
            again = await post("/v1/caption", one(good), {})
            return replies[:2], replies[2:-1], replies[-1], after, again

    goods, bads, chunked, after, again = asyncio.run(drive())
    failed = {name: repr(r) for name, r in zip(["good", "good", *cases, "chunked"], [*goods, *bads, chunked])
              if isinstance(r, Exception)}
    assert not failed, failed
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    expected_caption = live.predictor.caption([shape_image(4)])[0]
    for reply in goods:
        assert reply.status_code == 200 and reply.json() == {"caption": expected_caption}
    for (name, (_, _, _, status, code)), reply in zip(cases.items(), bads):
        body = reply.json()
        assert (reply.status_code, body["error"]["code"]) == (status, code), (name, reply.text)
        assert body["error"]["message"], name
    by_name = dict(zip(cases, bads))
    assert "num_beams=50" in by_name["bad decoding"].json()["error"]["message"]
    assert "4 files" in by_name["too many files"].json()["error"]["message"]
    assert after.status_code == 200 and again.status_code == 200  # still serving
    # every request, rejected or served, stopped counting as arriving (else later batches would wait for ghosts)
    assert live.server.config.app.state.batcher._arriving == 0
    # the requests announced as arriving are exactly the model endpoints (derived from the POST routes)
    from lavis_ext.serve.server import AnnounceArrivals

    announced = [m.kwargs["paths"] for m in live.server.config.app.user_middleware if m.cls is AnnounceArrivals]
    assert announced == [{"/v1/caption", "/v1/batch/caption", "/v1/vqa", "/v1/batch/vqa"}]


def test_batcher_error_reaches_only_its_own_batch(live):
    """A failing forward pass (injected for one decoding setting) fails only the requests batched with it."""
    from lavis_ext.serve.batching import MicroBatcher

    class FailsWithTwoBeams:
        def __init__(self, predictor):
            self.predictor, self.caption_prompt = predictor, predictor.caption_prompt

        def caption(self, images, prompt=None, decoding=None):
            if decoding.num_beams == 2:
                raise RuntimeError("injected failure")
            return self.predictor.caption(images, prompt=prompt, decoding=decoding)

    predictor = live.predictor
    ok, failing = predictor.caption_decoding, predictor.caption_decoding.with_options(num_beams=2)
    images = [shape_image(seed) for seed in range(4)]

    async def drive():
        batcher = MicroBatcher(FailsWithTwoBeams(predictor), max_batch=8, max_wait_ms=100)
        await batcher.start()
        try:
            results = await asyncio.gather(
                *(batcher.submit("caption", im, None, ok if i % 2 == 0 else failing) for i, im in enumerate(images)),
                return_exceptions=True)
            return results, batcher.stats.to_dict()
        finally:
            await batcher.stop()

    results, stats = asyncio.run(drive())
    assert results[0] == predictor.caption([images[0]])[0] and results[2] == predictor.caption([images[2]])[0]
    assert all(isinstance(r, RuntimeError) and "injected" in str(r) for r in (results[1], results[3]))
    assert stats["batches"] == 2 and stats["failed_batches"] == 1 and stats["max_batch_size"] == 2


def test_api_key_is_required_when_configured(live, monkeypatch):
    monkeypatch.delenv("LAVIS_TEST_KEY", raising=False)
    with pytest.raises(SystemExit, match="LAVIS_TEST_KEY"):
        settings_from_args(build_parser().parse_args(["--checkpoint", "x", "--api-key-env", "LAVIS_TEST_KEY"]))
    monkeypatch.setenv("LAVIS_TEST_KEY", "s3cret-key")
    settings = settings_from_args(build_parser().parse_args(["--checkpoint", "x", "--api-key-env", "LAVIS_TEST_KEY"]))
    assert settings.api_key == "s3cret-key"
    app = create_app(live.predictor, settings)
    files = {"image": ("s.png", png(shape_image(0)), "image/png")}
    with LiveServer(uvicorn_server(app)) as secured, httpx.Client(base_url=secured.url, timeout=60) as client:
        missing = client.post("/v1/caption", files=files)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
        wrong = client.post("/v1/caption", files=files, headers={"X-API-Key": "s3cret-kez"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/stats").status_code == 401
        assert client.post("/v1/caption", files=files, headers={"X-API-Key": "s3cret-key"}).status_code == 200
        bearer = client.post("/v1/caption", files=files, headers={"Authorization": "Bearer s3cret-key"})
        assert bearer.status_code == 200
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_vqa_answers_equal_predictor(trained_vqa_run):
    from lavis_ext.inference import load

    predictor = load(trained_vqa_run, device="cpu")
    app = create_app(predictor, ServerSettings(max_wait_ms=50))
    image, other = shape_image(1), shape_image(2)
    questions = ["what shape is it?", "what colour is the shape?"]
    with LiveServer(uvicorn_server(app)) as running, httpx.Client(base_url=running.url, timeout=60) as client:
        reply = client.post("/v1/vqa", files={"image": ("a.png", png(image), "image/png")},
                            data={"question": questions[0]})
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"question": questions[0], "answer": predictor.answer([image], [questions[0]])[0]}
        # one image, several questions
        reply = client.post("/v1/batch/vqa", files=[("images", ("a.png", png(image), "image/png"))],
                            data={"questions": questions})
        assert reply.status_code == 200, reply.text
        answers = [a["answer"] for a in reply.json()["answers"]]
        assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
        mismatch = client.post("/v1/batch/vqa", files=[("images", ("a.png", png(image), "image/png")),
                                                       ("images", ("b.png", png(other), "image/png")),
                                                       ("images", ("c.png", png(other), "image/png"))],
                               data={"questions": questions})
        assert mismatch.status_code == 422 and "3 images for 2 questions" in mismatch.json()["error"]["message"]


def test_two_workers_run_batches_side_by_side_with_the_same_answers(live):
    """``workers=2`` (small models on CPU): batches overlap in two threads; answers do not change."""
    from lavis_ext.serve.batching import MicroBatcher

    predictor = live.predictor
    images = [shape_image(seed) for seed in range(6)]

    async def drive():
        batcher = MicroBatcher(predictor, max_batch=2, max_wait_ms=50, workers=2)
        await batcher.start()
        try:
            results = await asyncio.gather(*(batcher.submit("caption", im, None, predictor.caption_decoding)
                                             for im in images))
            return results, batcher.stats.to_dict()
        finally:
            await batcher.stop()

    results, stats = asyncio.run(drive())
    assert results == [predictor.caption([im])[0] for im in images]
    assert stats["jobs"] == 6 and stats["batches"] == 3 and stats["failed_batches"] == 0
    with pytest.raises(ValueError, match="workers"):
        MicroBatcher(predictor, workers=0)


def test_stopping_the_batcher_fails_waiting_requests_with_503_errors(live):
    """Jobs that are already out of the queue (a batch still filling) are not left hanging on shutdown."""
    from lavis_ext.serve.batching import BatcherStoppedError, MicroBatcher

    async def drive():
        batcher = MicroBatcher(live.predictor, max_batch=8, max_wait_ms=60_000)
        await batcher.start()
        # three clients at once: the third finds two requests in flight, so the batch waits for company
        pending = [asyncio.ensure_future(batcher.submit("caption", shape_image(i), None, live.predictor.caption_decoding))
                   for i in range(3)]
        await asyncio.sleep(0.1)  # the collector holds the jobs, waiting for company
        assert batcher.wait_for_company() == 60.0 and batcher.stats.batches == 0
        await batcher.stop()
        for job in pending:
            with pytest.raises(BatcherStoppedError):
                await job
        with pytest.raises(BatcherStoppedError):
            await batcher.submit("caption", shape_image(0), None, live.predictor.caption_decoding)

    asyncio.run(drive())


def test_the_gradio_page_captions_a_sixteen_bit_upload_scaled(tmp_path):
    """The page's image input hands the file over as uploaded (type="filepath", image_mode=None), so
    ``validate_image_bytes`` scales it; with "pil"/"numpy" Gradio would convert (clip) it with PIL first."""
    gr = pytest.importorskip("gradio")
    from types import SimpleNamespace

    import numpy as np
    from gradio.data_classes import ImageData

    from lavis_ext.inference import Decoding
    from lavis_ext.serve.gradio_app import build_demo

    seen = []
    predictor = SimpleNamespace(caption_decoding=Decoding(), answer_decoding=Decoding(), arch="stub", source="run",
                                caption=lambda images, decoding=None: seen.extend(images) or ["a caption"])
    demo = build_demo(predictor)
    assert isinstance(demo, gr.Blocks)
    image_input = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "image")
    path = tmp_path / "scan.png"
    sixteen_bit().save(path)
    handed = image_input.preprocess(ImageData(path=str(path), orig_name="scan.png"))
    respond = next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == "respond")
    assert respond(handed, "", True, False, *([0] * 7))[0] == "a caption"
    expected = np.rint(np.asarray(sixteen_bit(), dtype=np.float64) / 257).astype(np.uint8)
    assert (np.asarray(seen[0]) == expected[..., None]).all()
