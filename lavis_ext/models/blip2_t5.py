"""BLIP-2 with a Flan-T5 encoder-decoder, on Hugging Face's current `T5ForConditionalGeneration`.

Why not LAVIS's `Blip2T5.__init__`: its vendored `modeling_t5.T5ForConditionalGeneration` has no
`.generate` under transformers >= 4.50 (`AttributeError: 'T5ForConditionalGeneration' object has no
attribute 'generate'`, blip2_t5.py:228/296), and it always loads hub weights and casts T5 to bf16.
Our ``__init__`` builds the same attributes with the hooks in :mod:`lavis_ext.models.components`,
so LAVIS's `forward`, `generate` and `predict_answers` run unchanged on the HF class.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base
from lavis.models.blip2_models.blip2_t5 import Blip2T5

from lavis_ext.models.components import Blip2ComponentsMixin, build_llm, env_path, vision_kwargs, resolve_dtype
from lavis_ext.models.model_types import lavis_model_types, tiny_config_path


@registry.register_model("blip2_t5_ext")
class Blip2T5Ext(Blip2ComponentsMixin, Blip2T5):
    """BLIP-2 Flan-T5. Real types keep LAVIS's names (``pretrain_flant5xl``, ``caption_coco_flant5xl``,
    ...); ``tiny`` is CPU-sized."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        **lavis_model_types(Blip2T5),
        "tiny": tiny_config_path("blip2_t5_tiny.yaml"),
    }

    def __init__(
        self,
        vit_model="eva_clip_g",
        img_size=224,
        drop_path_rate=0,
        use_grad_checkpoint=False,
        vit_precision="fp16",
        freeze_vit=True,
        num_query_token=32,
        t5_model="google/flan-t5-xl",
        prompt="",
        max_txt_len=32,
        apply_lemmatizer=False,
        t5_tokenizer=None,
        t5_config=None,
        freeze_llm=True,
        llm_precision="bf16",
        cross_attention_freq=2,
        components=None,
    ):
        self._remember_components(components)
        Blip2Base.__init__(self)  # skip Blip2T5.__init__ (see module docstring)

        self._build_vision_and_qformer(
            vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision, freeze_vit,
            num_query_token, cross_attention_freq,
        )

        # T5 overflows in fp16: the paper and LAVIS keep it in bf16 (fp32 on CPU, see the task).
        self.t5_tokenizer, self.t5_model = build_llm(
            "t5", env_path(t5_model), env_path(t5_tokenizer), t5_config, resolve_dtype(llm_precision, torch.bfloat16)
        )
        if freeze_llm:
            for param in self.t5_model.parameters():
                param.requires_grad = False

        self.t5_proj = nn.Linear(self.Qformer.config.hidden_size, self.t5_model.config.hidden_size)
        self.max_txt_len = max_txt_len
        self.prompt = prompt
        self._apply_lemmatizer = apply_lemmatizer
        self._lemmatizer = None

    def forward(self, samples):
        """Captioning batches carry only ``text_input`` (the caption): the prompt becomes the encoder
        input and the caption the target, matching `generate`. VQA batches carry both fields."""
        if "text_output" not in samples:
            samples = {**samples, "text_output": samples["text_input"], "text_input": [self.prompt] * len(samples["text_input"])}
        return super().forward(samples)

    @classmethod
    def from_config(cls, cfg):
        model = cls(
            **vision_kwargs(cfg),
            t5_model=cfg.get("t5_model"),
            prompt=cfg.get("prompt", ""),
            max_txt_len=cfg.get("max_txt_len", 32),
            apply_lemmatizer=cfg.get("apply_lemmatizer", False),
            t5_tokenizer=cfg.get("t5_tokenizer"),
            t5_config=cfg.get("t5_config"),
            freeze_llm=cfg.get("freeze_llm", True),
            llm_precision=cfg.get("llm_precision", "bf16"),
        )
        model.load_checkpoint_from_config(cfg)
        return model
