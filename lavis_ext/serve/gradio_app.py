"""A Gradio page for trying a trained BLIP-2: upload an image, optionally ask a question, tune decoding.

Same loader as everything else (:func:`lavis_ext.inference.load`), the same upload validation as the HTTP
server (:mod:`lavis_ext.serve.uploads`: truncated files refused, 16-bit images scaled) and decoding sliders
bounded by :attr:`Decoding.LIMITS`, so the page cannot ask for more than the server would allow. With no
question the model captions the image; with one it answers it.

Local by default: it listens on 127.0.0.1 and creates no public share link unless ``--share`` is given.

    lavis-ext gradio --checkpoint runs/tiny_caption_opt            # http://127.0.0.1:7860
    lavis-ext gradio --cfg-path projects/blip2/caption_coco_opt2.7b.yaml --options model.finetuned=ckpt.pth

Components carry ``elem_id`` (``image``, ``question``, ``submit``, ``output``, ``details``, ``use-defaults``,
``num-beams``, ...) so browser tests and custom CSS can find them.
"""
from __future__ import annotations

import argparse
import ipaddress
import sys
from pathlib import Path

import gradio as gr

from lavis_ext import inference
from lavis_ext.inference import Decoding
from lavis_ext.serve.uploads import UploadError, UploadLimits, validate_image_bytes

# (field, label, step, integer?) of each slider, in page order; bounds come from Decoding.LIMITS
SLIDERS = (
    ("num_beams", "Beams", 1, True),
    ("max_new_tokens", "Max new tokens", 1, True),
    ("min_new_tokens", "Min new tokens", 1, True),
    ("length_penalty", "Length penalty", 0.1, False),
    ("repetition_penalty", "Repetition penalty (captions)", 0.05, False),
    ("top_p", "Top-p (captions, sampling)", 0.01, False),
    ("temperature", "Temperature (captions, sampling)", 0.05, False),
)


def _decoding(default: Decoding, use_defaults: bool, nucleus: bool, values) -> Decoding:
    """The page's choice: the model's defaults, or every slider value checked against Decoding.LIMITS."""
    if use_defaults:
        return default
    options = {name: (int(value) if integer else float(value)) for (name, _, _, integer), value in zip(SLIDERS, values)}
    return default.with_options(use_nucleus_sampling=bool(nucleus), **options)


def build_demo(predictor, limits: UploadLimits | None = None) -> gr.Blocks:
    """The page around ``predictor`` (a :class:`lavis_ext.inference.Blip2Predictor`); launch it yourself.
    ``limits``: upload limits (default ``UploadLimits()``, the HTTP server's)."""
    limits = limits or UploadLimits()
    shown = predictor.caption_decoding

    def respond(image_path, question, use_defaults, nucleus, *values):
        if not image_path:
            raise gr.Error("Upload an image first.")
        path = Path(image_path)
        try:
            image = validate_image_bytes(path.read_bytes(), limits, filename=path.name)
        except UploadError as exc:
            raise gr.Error(exc.message) from None
        question = (question or "").strip()
        try:
            decoding = _decoding(predictor.answer_decoding if question else predictor.caption_decoding,
                                 use_defaults, nucleus, values)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        if question:
            text = predictor.answer([image], [question], decoding=decoding)[0]
        else:
            text = predictor.caption([image], decoding=decoding)[0]
        details = {"task": "vqa" if question else "caption", "question": question or None,
                   "decoding": decoding.to_dict(), "model": predictor.arch, "image_size": list(image.size)}
        return text.strip(), details

    with gr.Blocks(title="BLIP-2 (lavis-ext)", analytics_enabled=False) as demo:
        gr.Markdown(
            f"## BLIP-2 captioning and visual question answering\n"
            f"Model `{predictor.arch}` from `{Path(predictor.source).name}`. Upload an image and press "
            "Submit for a caption; type a question to get an answer instead."
        )
        with gr.Row():
            with gr.Column():
                # filepath + image_mode=None: Gradio hands over the uploaded file untouched, so it gets the server's
                # checks and a 16-bit PNG/TIFF is scaled by validate_image_bytes; type="pil"/"numpy" would
                # convert it with PIL first and clip it to near white
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 label="Image", elem_id="image")
                question = gr.Textbox(label="Question (optional)", placeholder="e.g. what colour is the circle?",
                                      elem_id="question")
                with gr.Accordion("Decoding options", open=False, elem_id="decoding"):
                    use_defaults = gr.Checkbox(
                        value=True, label="Use the model's defaults (the run's decoding for captions and for answers)",
                        elem_id="use-defaults",
                    )
                    nucleus = gr.Checkbox(value=shown.use_nucleus_sampling, label="Nucleus sampling (captions)",
                                          elem_id="nucleus")
                    sliders = [
                        gr.Slider(*Decoding.LIMITS[name], value=getattr(shown, name), step=step, label=label,
                                  elem_id=name.replace("_", "-"))
                        for name, label, step, _ in SLIDERS
                    ]
                submit = gr.Button("Submit", variant="primary", elem_id="submit")
            with gr.Column():
                output = gr.Textbox(label="Caption / answer", interactive=False, elem_id="output")
                details = gr.JSON(label="Details", elem_id="details")
        inputs = [image, question, use_defaults, nucleus, *sliders]
        submit.click(respond, inputs=inputs, outputs=[output, details])
        question.submit(respond, inputs=inputs, outputs=[output, details])
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lavis-ext gradio", description="A local Gradio page for a trained BLIP-2.")
    inference.add_source_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", default=False,
                        help="also create a public *.gradio.live link (off by default: anyone with it can use the model)")
    return parser


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    predictor = inference.load_from_args(args)
    if not _is_loopback(args.host):
        print(f"note: listening on {args.host}: the page is reachable from other machines", file=sys.stderr)
    limits = UploadLimits()
    build_demo(predictor, limits).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size=limits.max_bytes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
