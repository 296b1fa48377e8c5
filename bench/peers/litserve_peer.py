"""bench/serving.py's batched peer: the same model behind LitServe's own batching (``pip install -e .[bench]``).

In its own module, not bench/serving.py, because LitServe's inference workers are spawned processes that
unpickle this class by its module path; in a folder, so that run_all and the --help test do not take it for
a bench script.
"""
from __future__ import annotations

import io
from pathlib import Path

import litserve as ls

PROJECT = Path(__file__).resolve().parents[2] / "projects/tiny/caption_opt.yaml"


class CaptionAPI(ls.LitAPI):
    """One upload -> PIL RGB (as the plain peers decode it); a batch of them -> one ``predictor.caption`` call."""

    def __init__(self, threads: int, options: list[str], **kwargs):
        super().__init__(**kwargs)
        self.threads, self.options = threads, list(options)

    def setup(self, device):
        import torch

        from lavis_ext.inference import load

        torch.set_num_threads(self.threads)
        self.predictor = load(cfg_path=PROJECT, options=self.options, device="cpu")

    def decode_request(self, request):
        from PIL import Image

        return Image.open(io.BytesIO(request["image"].file.read())).convert("RGB")

    def predict(self, images):
        return self.predictor.caption(list(images))

    def encode_response(self, output):
        return {"caption": output}


def serve(port: int, threads: int, options: list[str], max_batch: int, max_wait_ms: float, workers: int) -> None:
    """LitServe with ``max_batch_size`` / ``batch_timeout`` / inference workers equal to ours' settings."""
    api = CaptionAPI(threads, options, max_batch_size=max_batch, batch_timeout=max_wait_ms / 1000,
                     api_path="/v1/caption")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers, healthcheck_path="/readyz")
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)
