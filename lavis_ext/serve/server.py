"""The HTTP server: FastAPI app over one loaded BLIP-2, with micro-batching and validated uploads.

``lavis-ext serve --checkpoint RUN_DIR`` (or ``--cfg-path YAML [--options ...]``) loads the model through
``lavis_ext.inference.load`` (the same weights, preprocessing and decoding defaults as evaluation) and
serves, on 127.0.0.1 unless ``--host`` says otherwise:

* ``POST /v1/caption``        one image (multipart field ``image``), optional ``prompt``, decoding options
* ``POST /v1/vqa``            one image and a ``question``
* ``POST /v1/batch/caption``  several images (field ``images``, repeated)
* ``POST /v1/batch/vqa``      several images with one ``questions`` field each, or one image and several questions
* ``GET /v1/model``           what is loaded (source, arch, prompts, decoding defaults and limits)
* ``GET /healthz``            the process answers; ``GET /readyz`` the model is loaded and the batcher runs
* ``GET /stats``              micro-batching counters (batch-size histogram)
* ``GET /docs``               OpenAPI UI

Every error is JSON ``{"error": {"code": ..., "message": ...}}``: bad uploads 400/413/415 (see
``lavis_ext.serve.uploads``), bad decoding options 422 (``Decoding``'s own message), missing/wrong API
key 401, overload 503. With ``--api-key-env VAR`` the key in that environment variable is required in the
``X-API-Key`` header (or ``Authorization: Bearer KEY``) on ``/v1/*`` and ``/stats``; health checks and docs
stay open so orchestrators can probe them.
"""
# No `from __future__ import annotations`: FastAPI resolves the endpoints' local Annotated types at runtime.
import argparse
import hmac
import ipaddress
import logging
import os
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from lavis_ext.serve import batching
from lavis_ext.serve.batching import BatcherStoppedError, MicroBatcher, QueueFullError
from lavis_ext.serve.uploads import (
    UploadError,
    UploadLimits,
    check_file_count,
    check_size,
    validate_image_bytes,
)

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
# Uploads up to this size are validated and decoded on the event loop: a thumbnail-sized image decodes in well under
# a millisecond, less than the hop to the thread pool and back adds to a lone request's latency (a 64 px PNG: ~60 µs
# to decode). Larger ones go to the thread pool so that a multi-megapixel decode never stalls other requests.
INLINE_DECODE_BYTES = 32 * 1024


@dataclass(frozen=True)
class ServerSettings:
    """Everything about serving that is not the model: address, auth, upload limits, batching."""

    host: str = DEFAULT_HOST
    port: int = 8000
    api_key: str | None = None
    limits: UploadLimits = field(default_factory=UploadLimits)
    max_batch: int = batching.DEFAULT_MAX_BATCH
    max_wait_ms: float = batching.DEFAULT_MAX_WAIT_MS
    arrival_wait_ms: float = batching.DEFAULT_ARRIVAL_WAIT_MS
    max_queue: int = batching.DEFAULT_MAX_QUEUE
    workers: int = 1
    max_questions: int = 16

    @property
    def max_body_bytes(self) -> int:
        """Whole-request cap: every allowed file at its byte limit plus room for form fields and framing."""
        return self.limits.max_files * self.limits.max_bytes + 1024 * 1024


class ApiError(Exception):
    """An error with an HTTP status and a stable code, rendered as ``{"error": {...}}``."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


class DeclaredBodySizeLimit:
    """Pure ASGI middleware: a JSON 413 for a request whose Content-Length exceeds ``max_bytes``."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            declared = dict(scope.get("headers") or []).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_bytes:
                response = _error(413, "request_too_large", f"request body of {int(declared)} bytes exceeds "
                                  f"{self.max_bytes}; send fewer or smaller files")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class AnnounceArrivals:
    """Pure ASGI middleware: a request to a model endpoint counts as arriving at the batcher while its body is read
    and checked, until its jobs are queued (:meth:`MicroBatcher.arriving`), so a batch waits for it."""

    def __init__(self, app, batcher: MicroBatcher, paths: set[str]):
        self.app, self.batcher, self.paths = app, batcher, paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        with self.batcher.arriving():
            return await self.app(scope, receive, send)


def create_app(predictor, settings: ServerSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``predictor`` (a ``lavis_ext.inference.Blip2Predictor``).

    The micro-batcher starts and stops with the app's lifespan, so the app works under any ASGI server.
    """
    from lavis_ext.inference import Decoding

    settings = settings or ServerSettings()
    batcher = MicroBatcher(predictor, settings.max_batch, settings.max_wait_ms, settings.max_queue, settings.workers,
                           settings.arrival_wait_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(
        title="lavis-ext BLIP-2",
        version=_version(),
        summary=f"Captioning and visual question answering with {predictor.arch}",
        lifespan=lifespan,
    )
    app.state.predictor = predictor
    app.state.batcher = batcher
    app.state.settings = settings
    # A cap on the whole body: Starlette's multipart parser does not limit file parts and uvicorn has no
    # body limit, so without one a client could make the server spool gigabytes before any endpoint runs.
    # Starlette's limiter counts streamed bodies (its 413 reaches our JSON handler below); it answers a too
    # large *declared* Content-Length in plain text, so that case is rejected first, in JSON, outside it.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_body_bytes)
    app.add_middleware(DeclaredBodySizeLimit, max_bytes=settings.max_body_bytes)
    # outermost: from the headers on; the model endpoints (every POST route) are filled in once they are declared
    model_paths: set[str] = set()
    app.add_middleware(AnnounceArrivals, batcher=batcher, paths=model_paths)

    # ---- errors: one JSON shape ------------------------------------------------------------------
    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError):
        return _error(exc.status, exc.code, exc.message)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return _error(exc.status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query"))
            given = err.get("input")
            shown = f" (got {given!r})" if isinstance(given, (str, int, float)) and len(repr(given)) < 80 else ""
            parts.append(f"{where}: {err.get('msg')}{shown}")
        return _error(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status_code, "http_error")
        message = str(exc.detail)
        if exc.status_code == 413:
            message = f"request body exceeds {settings.max_body_bytes} bytes; send fewer or smaller files"
        return _error(exc.status_code, code, message, getattr(exc, "headers", None))

    # ---- auth ------------------------------------------------------------------------------------
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="required when the server has an API key")
    bearer = HTTPBearer(auto_error=False)
    expected = settings.api_key.encode() if settings.api_key else None

    async def require_key(
        x_api_key: Annotated[str | None, Depends(key_header)],
        authorization: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if expected is None:
            return
        given = x_api_key or (authorization.credentials if authorization else None)
        if not given:
            raise ApiError(401, "missing_api_key", "this server requires an API key in the X-API-Key header")
        if not hmac.compare_digest(given.encode(), expected):  # constant time: no key prefix leaks by timing
            raise ApiError(401, "invalid_api_key", "the API key is not valid")

    secured = [Depends(require_key)]

    # ---- helpers ---------------------------------------------------------------------------------
    async def read_images(files: list[UploadFile]) -> list:
        check_file_count(len(files), settings.limits)
        images = []
        for upload in files:
            data = await upload.read(settings.limits.max_bytes + 1)  # never more than one byte over the limit
            check_size(len(data), settings.limits, upload.filename)
            if len(data) <= INLINE_DECODE_BYTES:  # decoding costs less than a hop to the thread pool and back
                images.append(validate_image_bytes(data, settings.limits, upload.filename))
            else:
                images.append(await run_in_threadpool(validate_image_bytes, data, settings.limits, upload.filename))
        return images

    def decoding_for(base: Decoding, **options) -> Decoding:
        try:
            return base.with_options(**options)
        except ValueError as exc:
            raise ApiError(422, "invalid_decoding", str(exc)) from None

    async def run(task: str, images: list, texts: list, decoding: Decoding) -> list[str]:
        try:
            return await batcher.submit_many(task, images, texts, decoding)
        except (QueueFullError, BatcherStoppedError) as exc:
            raise ApiError(503, "unavailable", str(exc)) from None
        except ValueError as exc:
            raise ApiError(422, "invalid_request", str(exc)) from None

    def clean_text(name: str, value: str | None, required: bool) -> str | None:
        if value is None or not value.strip():
            if required:
                raise ApiError(422, "invalid_request", f"{name} must be a non-empty string")
            return None
        if len(value) > 1000:
            raise ApiError(422, "invalid_request", f"{name} is {len(value)} characters; at most 1000 are accepted")
        return value

    # Decoding fields as form parameters (documented in OpenAPI with their limits).
    limits = Decoding.LIMITS

    def _doc(name):
        low, high = limits[name]
        return f"in [{low}, {high}]; default: the model's"

    NumBeams = Annotated[int | None, Form(description=_doc("num_beams"))]
    MaxNew = Annotated[int | None, Form(description=_doc("max_new_tokens"))]
    MinNew = Annotated[int | None, Form(description=_doc("min_new_tokens"))]
    LengthPenalty = Annotated[float | None, Form(description=_doc("length_penalty"))]
    RepPenalty = Annotated[float | None, Form(description=_doc("repetition_penalty"))]
    Nucleus = Annotated[bool | None, Form(description="sample with top-p instead of beam search")]
    TopP = Annotated[float | None, Form(description=_doc("top_p"))]
    Temperature = Annotated[float | None, Form(description=_doc("temperature"))]
    Prompt = Annotated[str | None, Form(description="text the caption continues; default: the training prompt")]

    # One dependency per task turns the form fields into a checked Decoding (422 naming a bad value); async, so
    # FastAPI runs it on the event loop instead of sending this microsecond of work through its thread pool.
    async def caption_decoding(
        num_beams: NumBeams = None, max_new_tokens: MaxNew = None, min_new_tokens: MinNew = None,
        length_penalty: LengthPenalty = None, repetition_penalty: RepPenalty = None,
        use_nucleus_sampling: Nucleus = None, top_p: TopP = None, temperature: Temperature = None,
    ) -> Decoding:
        return decoding_for(
            predictor.caption_decoding, num_beams=num_beams, max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens, length_penalty=length_penalty, repetition_penalty=repetition_penalty,
            use_nucleus_sampling=use_nucleus_sampling, top_p=top_p, temperature=temperature,
        )

    async def answer_decoding(
        num_beams: NumBeams = None, max_new_tokens: MaxNew = None, min_new_tokens: MinNew = None,
        length_penalty: LengthPenalty = None,
    ) -> Decoding:
        return decoding_for(predictor.answer_decoding, num_beams=num_beams, max_new_tokens=max_new_tokens,
                            min_new_tokens=min_new_tokens, length_penalty=length_penalty)

    CaptionDecoding = Annotated[Decoding, Depends(caption_decoding)]
    AnswerDecoding = Annotated[Decoding, Depends(answer_decoding)]

    # ---- endpoints -------------------------------------------------------------------------------
    @app.get("/healthz", tags=["health"])
    async def healthz():
        """The process is up and the event loop answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    async def readyz():
        """The model is loaded and the batcher is running (503 otherwise)."""
        if not batcher.running:
            return _error(503, "not_ready", "the model worker is not running")
        return {"status": "ready", "model": predictor.arch, "queue_depth": batcher.queue_depth}

    @app.get("/stats", tags=["health"], dependencies=secured)
    async def stats():
        """Micro-batching counters: jobs, batches, batch-size histogram, current queue depth."""
        return {**batcher.stats.to_dict(), "queue_depth": batcher.queue_depth,
                "max_batch": batcher.max_batch, "max_wait_ms": batcher.max_wait * 1000,
                "arrival_wait_ms": batcher.arrival_wait * 1000, "workers": batcher.workers}

    @app.get("/v1/model", tags=["model"], dependencies=secured)
    async def model_info():
        """What is loaded, its prompts and decoding defaults, the decoding and upload limits."""
        return {**predictor.describe(), "decoding_limits": {k: list(v) for k, v in limits.items()},
                "upload_limits": {"max_bytes": settings.limits.max_bytes, "max_pixels": settings.limits.max_pixels,
                                  "max_files": settings.limits.max_files,
                                  "formats": list(settings.limits.allowed_formats)}}

    @app.post("/v1/caption", tags=["caption"], dependencies=secured)
    async def caption(
        image: Annotated[UploadFile, File(description="the image (JPEG, PNG, WEBP, GIF, BMP, TIFF)")],
        decoding: CaptionDecoding, prompt: Prompt = None,
    ):
        """Caption one image."""
        prompt = clean_text("prompt", prompt, required=False)
        images = await read_images([image])
        (text,) = await run("caption", images, [prompt], decoding)
        return {"caption": text}

    @app.post("/v1/batch/caption", tags=["caption"], dependencies=secured)
    async def batch_caption(
        images: Annotated[list[UploadFile], File(description="several images (repeat the field)")],
        decoding: CaptionDecoding, prompt: Prompt = None,
    ):
        """Caption several images; captions come back in upload order."""
        prompt = clean_text("prompt", prompt, required=False)
        pil_images = await read_images(images)
        texts = await run("caption", pil_images, [prompt] * len(pil_images), decoding)
        return {"captions": [{"filename": f.filename, "caption": t} for f, t in zip(images, texts)]}

    @app.post("/v1/vqa", tags=["vqa"], dependencies=secured)
    async def vqa(
        image: Annotated[UploadFile, File(description="the image")],
        question: Annotated[str, Form(description="a question about the image")],
        decoding: AnswerDecoding,
    ):
        """Answer one question about one image."""
        question = clean_text("question", question, required=True)
        images = await read_images([image])
        (answer,) = await run("vqa", images, [question], decoding)
        return {"question": question, "answer": answer}

    @app.post("/v1/batch/vqa", tags=["vqa"], dependencies=secured)
    async def batch_vqa(
        images: Annotated[list[UploadFile], File(description="one image per question, or one image for all")],
        questions: Annotated[list[str], Form(description="questions (repeat the field)")],
        decoding: AnswerDecoding,
    ):
        """Answer ``questions[i]`` about ``images[i]``, or every question about a single image."""
        if not questions or len(questions) > settings.max_questions:
            raise ApiError(422, "invalid_request", f"send 1 to {settings.max_questions} questions, got {len(questions)}")
        questions = [clean_text(f"questions[{i}]", q, required=True) for i, q in enumerate(questions)]
        if len(images) not in (1, len(questions)):
            raise ApiError(422, "invalid_request",
                           f"got {len(images)} images for {len(questions)} questions; send one image or one per question")
        pil_images = await read_images(images)
        if len(pil_images) == 1:
            pil_images = pil_images * len(questions)
        answers = await run("vqa", pil_images, questions, decoding)
        return {"answers": [{"question": q, "answer": a} for q, a in zip(questions, answers)]}

    model_paths.update(r.path for r in app.routes if "POST" in getattr(r, "methods", ()))  # the batcher's requests
    return app


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("lavis-ext")
    except Exception:  # noqa: BLE001  (not installed as a distribution: running from a checkout)
        return "0"


# ---- command line ---------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from lavis_ext import inference

    parser = argparse.ArgumentParser(prog="lavis-ext serve", description="Serve a BLIP-2 checkpoint over HTTP.")
    inference.add_source_arguments(parser)
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument("--api-key-env", metavar="VAR", help="require the API key held in environment variable VAR")
    parser.add_argument("--max-batch", type=int, default=ServerSettings.max_batch,
                        help=f"most requests per forward pass (default {ServerSettings.max_batch})")
    parser.add_argument("--max-wait-ms", type=float, default=ServerSettings.max_wait_ms,
                        help=f"longest wait for a batch to fill (default {ServerSettings.max_wait_ms:g})")
    parser.add_argument("--arrival-wait-ms", type=float, default=ServerSettings.arrival_wait_ms,
                        help="longest a batch that is not full waits while requests are still being received "
                             f"(default {ServerSettings.arrival_wait_ms:g})")
    parser.add_argument("--max-queue", type=int, default=ServerSettings.max_queue,
                        help=f"waiting requests before 503 (default {ServerSettings.max_queue})")
    parser.add_argument("--workers", type=int, default=ServerSettings.workers,
                        help=f"batches computed at once (default {ServerSettings.workers}; on a CPU with a small model, "
                             "up to the core count)")
    parser.add_argument("--max-bytes", type=int, default=UploadLimits.max_bytes, help="bytes per uploaded file")
    parser.add_argument("--max-pixels", type=int, default=UploadLimits.max_pixels, help="pixels per image")
    parser.add_argument("--max-files", type=int, default=UploadLimits.max_files, help="files per request")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default info)")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Validated settings from parsed arguments; the API key is read from the named variable here."""
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise SystemExit(f"--api-key-env {args.api_key_env}: that environment variable is unset or empty; "
                             f"export {args.api_key_env}=<key> first")
    if args.workers < 1 or args.max_batch < 1 or args.max_queue < 1 or args.max_wait_ms < 0 or args.arrival_wait_ms < 0:
        raise SystemExit("--workers, --max-batch and --max-queue must be >= 1, --max-wait-ms and --arrival-wait-ms >= 0")
    if not 0 <= args.port <= 65535:
        raise SystemExit(f"--port {args.port} is not a valid port (0-65535)")
    try:
        limits = UploadLimits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, max_files=args.max_files)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if not _is_loopback(args.host) and api_key is None:
        logger.warning("binding %s without an API key: anyone who can reach this address can use the model", args.host)
    return ServerSettings(host=args.host, port=args.port, api_key=api_key, limits=limits, max_batch=args.max_batch,
                          max_wait_ms=args.max_wait_ms, arrival_wait_ms=args.arrival_wait_ms, max_queue=args.max_queue,
                          workers=args.workers)


def build_server(argv: list[str] | None = None):
    """Parse ``argv``, load the model, return the (not yet started) ``uvicorn.Server``."""
    import uvicorn

    from lavis_ext import inference

    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise SystemExit(f"--threads {args.threads} must be >= 1")
        torch.set_num_threads(args.threads)
    predictor = inference.load_from_args(args)
    app = create_app(predictor, settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                            timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


def main(argv: list[str] | None = None) -> int:
    """``lavis-ext serve``: load, bind, serve until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = build_server(argv)
    server.run()
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
