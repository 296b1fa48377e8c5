"""BLIP-2 with a Flan-T5 encoder-decoder, on Hugging Face's current `T5ForConditionalGeneration`.

Why not LAVIS's `Blip2T5.__init__`: its vendored `modeling_t5.T5ForConditionalGeneration` has no
`.generate` under transformers >= 4.50 (`AttributeError: 'T5ForConditionalGeneration' object has no
attribute 'generate'`, blip2_t5.py:228/296), and it always loads hub weights and casts T5 to bf16.
Our ``__init__`` builds the same attributes with the hooks in :mod:`lavis_ext.models.components`.
`forward`, `generate` and `predict_answers` follow LAVIS's but start from the shared
`encode_queries` (so the question can reach the Q-Former) and train VQA on weighted answers.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base
from lavis.models.blip2_models.blip2_t5 import Blip2T5

from lavis_ext.models.answers import expand_answers, weighted_sequence_loss
from lavis_ext.models.generation import Blip2GenerationMixin
from lavis_ext.models.components import (
    Blip2ComponentsMixin, env_path, llm_kwargs, llm_model_options, vision_kwargs, with_options,
)
from lavis_ext.models.llm_specs import T5
from lavis_ext.models.model_types import lavis_model_types, tiny_config_path
from lavis_ext.models.strategies import finish_from_config



@registry.register_model("blip2_t5_ext")
class Blip2T5Ext(Blip2ComponentsMixin, Blip2GenerationMixin, Blip2T5):
    """BLIP-2 Flan-T5. Real types keep LAVIS's names (``pretrain_flant5xl``, ``caption_coco_flant5xl``,
    ...); ``tiny`` is CPU-sized."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        **lavis_model_types(Blip2T5),
        "tiny": tiny_config_path("blip2_t5_tiny.yaml"),
    }
    # every model.* key this class reads, with its default (lavis_ext.models.components): the shared ones, the LLM
    # ones, t5_model / t5_tokenizer / t5_config, and LAVIS's answer lemmatizer (its OK-VQA protocol for Flan-T5).
    # No decode_impl: Flan-T5 always decodes with transformers' generate.
    model_options = llm_model_options(T5, apply_lemmatizer=False)

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
        llm_precision=None,  # the family default (LLMSpec.default_storage: bf16)
        cross_attention_freq=2,
        components=None,
        qformer_text_input=False,
        llm_quantization=None,  # an LLMQuantization (model.llm_quantization keys): 8/4-bit LLM weights
    ):
        self._remember_components(components)
        Blip2Base.__init__(self)  # skip Blip2T5.__init__ (see module docstring)

        self.max_txt_len = max_txt_len  # the Q-Former's question tokenizer reads it
        self._build_vision_and_qformer(
            vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision, freeze_vit,
            num_query_token, cross_attention_freq, qformer_text_input,
        )

        self.t5_tokenizer, self.t5_model = T5.build(
            env_path(t5_model), env_path(t5_tokenizer), t5_config, T5.storage_dtype(llm_precision),
            llm_quantization,
        )
        if freeze_llm:
            for param in self.t5_model.parameters():
                param.requires_grad = False

        self.t5_proj = nn.Linear(self.Qformer.config.hidden_size, self.t5_model.config.hidden_size)
        self.prompt = prompt
        self._apply_lemmatizer = apply_lemmatizer
        self._lemmatizer = None

    def encode_image_for_llm(self, image: torch.Tensor | None = None, questions=None, image_embeds=None):
        """Image or its ``encode_vision`` features (and question, see ``qformer_text_input``) -> query
        embeddings in T5's space (the prefix of the encoder input), mask."""
        inputs_t5 = self.t5_proj(self.encode_queries(image, questions, image_embeds))
        atts_t5 = torch.ones(inputs_t5.size()[:-1], dtype=torch.long, device=inputs_t5.device)
        return inputs_t5, atts_t5

    def _encoder_inputs(self, image, prompts, qformer_text, index=None):
        """[query embeddings; embedded prompt] and their mask, rows repeated by ``index``."""
        inputs_t5, atts_t5 = self.encode_image_for_llm(image, qformer_text)
        if index is not None:
            inputs_t5, atts_t5 = inputs_t5[index], atts_t5[index]
            prompts = [prompts[i] for i in index]
        return self._prefix_prompts(inputs_t5, atts_t5, prompts)

    def _prefix_prompts(self, inputs_t5, atts_t5, prompts):
        tokens = self.t5_tokenizer(
            list(prompts), padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
        ).to(inputs_t5.device)
        embeds = self.t5_model.get_input_embeddings()(tokens.input_ids)
        inputs_embeds = torch.cat([inputs_t5.to(embeds.dtype), embeds], dim=1)
        return inputs_embeds, torch.cat([atts_t5, tokens.attention_mask], dim=1)

    def forward(self, samples):
        """Captioning batches carry only ``text_input`` (the caption): the model prompt is the encoder
        input and the caption the target, matching `generate`. VQA batches (``text_output``) encode the
        prompted question and target every distinct answer, weighted by its votes."""
        image = samples["image"]
        if "text_output" not in samples:
            prompts, qformer_text = [self.prompt] * image.size(0), None
            targets, weights, index = list(samples["text_input"]), None, None
        else:
            prompts = list(samples["text_input"])
            qformer_text = samples.get("question", prompts)
            targets, weights, index = expand_answers(samples)
        inputs_embeds, attention_mask = self._encoder_inputs(image, prompts, qformer_text, index)
        with self.maybe_autocast(block=self.t5_model):
            output_tokens = self.t5_tokenizer(
                targets, padding="longest", truncation=True, max_length=self.max_txt_len, return_tensors="pt"
            ).to(image.device)
            labels = output_tokens.input_ids.masked_fill(output_tokens.input_ids == self.t5_tokenizer.pad_token_id, -100)
            outputs = self.t5_model(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                decoder_attention_mask=output_tokens.attention_mask,
                labels=labels,
                return_dict=True,
            )
        if weights is None:
            return {"loss": outputs.loss}
        return {"loss": weighted_sequence_loss(outputs.logits, labels, weights, num_questions=len(prompts))}

    def generate_from_llm_inputs(self, inputs_t5, atts_t5, prompts, **generate_kwargs):
        """Decode from the image prefix (``encode_image_for_llm``, or an exported image encoder's output)
        followed by each prompt; Hugging Face ``generate`` keyword arguments pass through."""
        inputs_embeds, attention_mask = self._prefix_prompts(inputs_t5, atts_t5, prompts)
        with self.maybe_autocast(block=self.t5_model):
            outputs = self.t5_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)
        return [text.strip() for text in self.t5_tokenizer.batch_decode(outputs, skip_special_tokens=True)]

    def _postprocess_answers(self, answers):
        return self._lemmatize(answers) if self._apply_lemmatizer else answers

    @classmethod
    def from_config(cls, cfg):
        opts = cls.options(cfg)
        model = cls(
            **vision_kwargs(opts), **llm_kwargs(opts, cfg, T5),
            max_txt_len=opts["max_txt_len"], apply_lemmatizer=opts["apply_lemmatizer"],
        )
        return finish_from_config(model, with_options(cfg, opts))
