"""LangChain tools: image captioning and visual question answering on a loaded BLIP-2 predictor.

Typed input schemas (pydantic ``args_schema``) instead of the ``"path|question"`` single strings older
examples parse: a tool-calling model fills ``image_path`` and ``question`` as separate JSON fields, the
decoding fields are bounded by :attr:`lavis_ext.inference.Decoding.LIMITS`, and unknown fields are
rejected. Both kinds of failure an agent can cause (bad arguments, a missing or non-image file) come back
to the model as an error tool message (``status="error"``) it can act on, instead of ending the run.

    from lavis_ext.inference import load
    from lavis_ext.serve.langchain_tools import ImageCaptionTool, VisualQuestionTool

    caption_tool = ImageCaptionTool(predictor=load("runs/caption"))
    vqa_tool = VisualQuestionTool(predictor=load("runs/vqa"))
    llm_with_tools = chat_model.bind_tools([caption_tool, vqa_tool])

Images go through the same validation as HTTP uploads (:mod:`lavis_ext.serve.uploads`: truncated files refused,
16-bit scans scaled to 8 bits). ``allowed_dir``
confines the paths an agent may open (the model chooses the path, so confine it when prompts are untrusted).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.tools import BaseTool, ToolException
from pydantic import BaseModel, ConfigDict, Field

from lavis_ext.inference import Decoding
from lavis_ext.serve.uploads import UploadError, UploadLimits, check_size, validate_image_bytes

_BEAMS = Decoding.LIMITS["num_beams"]
_TOKENS = Decoding.LIMITS["max_new_tokens"]


class ImageCaptionInput(BaseModel):
    """Arguments of :class:`ImageCaptionTool`."""

    model_config = ConfigDict(extra="forbid")

    image_path: str = Field(min_length=1, description="Path of the image file to describe (PNG, JPEG, WEBP, ...).")
    num_beams: int | None = Field(
        default=None, ge=_BEAMS[0], le=_BEAMS[1], description="Beam search width; omit for the model's default."
    )
    max_new_tokens: int | None = Field(
        default=None, ge=_TOKENS[0], le=_TOKENS[1], description="Longest output in tokens; omit for the model's default."
    )


class VisualQuestionInput(ImageCaptionInput):
    """Arguments of :class:`VisualQuestionTool`."""

    question: str = Field(min_length=1, description="The question about the image, in natural language.")


def _validation_message(error) -> str:
    """A pydantic validation error as one line naming each bad field (what the model must fix)."""
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'input'}: {e['msg']}" for e in error.errors()]
    return "invalid tool arguments: " + "; ".join(parts)


class _ImageTool(BaseTool):
    """Shared parts: the predictor, image loading with upload limits, decoding options."""

    predictor: Any = Field(exclude=True, description="a lavis_ext.inference.Blip2Predictor")
    limits: UploadLimits = Field(default_factory=UploadLimits, exclude=True)
    allowed_dir: Path | None = Field(default=None, exclude=True)
    handle_tool_error: bool = True
    handle_validation_error: Any = _validation_message

    def _load_image(self, image_path: str):
        path = Path(image_path).expanduser()
        if self.allowed_dir is not None:
            root = Path(self.allowed_dir).resolve()
            if not path.resolve().is_relative_to(root):
                raise ToolException(f"image_path {image_path!r} is outside the allowed directory {str(root)!r}")
        if not path.is_file():
            raise ToolException(f"image file {image_path!r} does not exist; give the path of an existing image")
        try:
            check_size(path.stat().st_size, self.limits, filename=image_path)  # before reading it into memory
            return validate_image_bytes(path.read_bytes(), self.limits, filename=image_path)
        except UploadError as exc:
            raise ToolException(exc.message) from None
        except OSError as exc:
            raise ToolException(f"cannot read image file {image_path!r}: {exc}") from None

    @staticmethod
    def _decoding(default: Decoding, num_beams, max_new_tokens) -> Decoding:
        try:
            decoding = default.with_options(num_beams=num_beams, max_new_tokens=max_new_tokens)
            if decoding.min_new_tokens > decoding.max_new_tokens:
                decoding = decoding.with_options(min_new_tokens=decoding.max_new_tokens)
            return decoding
        except ValueError as exc:
            raise ToolException(str(exc)) from None


class ImageCaptionTool(_ImageTool):
    """Describe an image file in one sentence (BLIP-2 captioning)."""

    name: str = "image_caption"
    description: str = (
        "Describe what an image file shows, in one short sentence. Input: the image file's path. "
        "Use it when you need to know the content of an image."
    )
    args_schema: type[BaseModel] = ImageCaptionInput

    def _run(self, image_path: str, num_beams: int | None = None, max_new_tokens: int | None = None,
             run_manager=None) -> str:
        image = self._load_image(image_path)
        decoding = self._decoding(self.predictor.caption_decoding, num_beams, max_new_tokens)
        return self.predictor.caption([image], decoding=decoding)[0].strip()


class VisualQuestionTool(_ImageTool):
    """Answer a question about an image file (BLIP-2 visual question answering)."""

    name: str = "visual_question_answering"
    description: str = (
        "Answer a question about an image file with a short answer (a word or a few). Inputs: the image "
        "file's path and the question. Use it for specific facts: colours, counts, positions, objects."
    )
    args_schema: type[BaseModel] = VisualQuestionInput

    def _run(self, image_path: str, question: str, num_beams: int | None = None, max_new_tokens: int | None = None,
             run_manager=None) -> str:
        if not question.strip():
            raise ToolException("question is empty; ask a question about the image")
        image = self._load_image(image_path)
        decoding = self._decoding(self.predictor.answer_decoding, num_beams, max_new_tokens)
        return self.predictor.answer([image], [question], decoding=decoding)[0].strip()
