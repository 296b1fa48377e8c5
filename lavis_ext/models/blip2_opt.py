"""BLIP-2 with an OPT decoder, on Hugging Face's current `OPTForCausalLM`.

Why not LAVIS's `Blip2OPT.__init__`: it builds LAVIS's vendored `modeling_opt.OPTForCausalLM`, which
has no `.generate` under transformers >= 4.50 (`AttributeError: 'OPTForCausalLM' object has no
attribute 'generate'`), always loads fp16 weights from a hub name, and always freezes the LLM. Our
``__init__`` builds the same attributes (so LAVIS's `forward` runs unchanged) from the hooks in
:mod:`lavis_ext.models.components`. `generate` feeds ``inputs_embeds`` to HF generation (greedy,
beam, nucleus, several captions), and `predict_answers` (absent in 1.0.2) makes OPT usable for VQA.
"""
from __future__ import annotations


import torch
import torch.nn as nn
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base
from lavis.models.blip2_models.blip2_opt import Blip2OPT

from lavis_ext.models.components import Blip2ComponentsMixin, build_llm, env_path, vision_kwargs, resolve_dtype
from lavis_ext.models.model_types import lavis_model_types, tiny_config_path


@registry.register_model("blip2_opt_ext")
class Blip2OPTExt(Blip2ComponentsMixin, Blip2OPT):
    """BLIP-2 OPT. Real types keep LAVIS's names (``pretrain_opt2.7b``, ``caption_coco_opt2.7b``, ...);
    ``tiny`` is the CPU-sized model trained by ``make demo``."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        **lavis_model_types(Blip2OPT),
        "tiny": tiny_config_path("blip2_opt_tiny.yaml"),
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
        opt_model="facebook/opt-2.7b",
        prompt="",
        max_txt_len=32,
        opt_tokenizer=None,
        opt_config=None,
        freeze_llm=True,
        llm_precision="fp16",
        cross_attention_freq=2,
        components=None,
    ):
        self._remember_components(components)
        Blip2Base.__init__(self)  # skip Blip2OPT.__init__ (see module docstring)

        self._build_vision_and_qformer(
            vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision, freeze_vit,
            num_query_token, cross_attention_freq,
        )

        self.opt_tokenizer, self.opt_model = build_llm(
            "opt", env_path(opt_model), env_path(opt_tokenizer), opt_config, resolve_dtype(llm_precision, torch.float16)
        )
        if freeze_llm:
            for param in self.opt_model.parameters():
                param.requires_grad = False
        # A caption ends at the first "\n" (LAVIS's convention for OPT).
        self.eos_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]

        self.opt_proj = nn.Linear(self.Qformer.config.hidden_size, self.opt_model.config.hidden_size)
        self.max_txt_len = max_txt_len
        self.prompt = prompt
        prompt_tokens = self.opt_tokenizer(self.prompt, return_tensors="pt")
        self.prompt_length = prompt_tokens.attention_mask.sum(1)

    # ---- shared image path ----------------------------------------------------------------------
    def encode_image_for_llm(self, image: torch.Tensor):
        """Image -> (query embeddings in the LLM's space, their attention mask)."""
        with self.maybe_autocast():
            image_embeds = self.ln_vision(self.visual_encoder(image))
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long, device=image.device)
        query_tokens = self.query_tokens.expand(image_embeds.shape[0], -1, -1)
        query_output = self.Qformer.bert(
            query_embeds=query_tokens,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        inputs_opt = self.opt_proj(query_output.last_hidden_state)
        atts_opt = torch.ones(inputs_opt.size()[:-1], dtype=torch.long, device=image.device)
        return inputs_opt, atts_opt

    def _generate_from_prompts(self, image, prompts, **generate_kwargs):
        inputs_opt, atts_opt = self.encode_image_for_llm(image)
        self.opt_tokenizer.padding_side = "left"
        opt_tokens = self.opt_tokenizer(prompts, return_tensors="pt", padding="longest").to(image.device)
        embed = self.opt_model.get_input_embeddings()
        inputs_embeds = torch.cat([inputs_opt.to(embed.weight.dtype), embed(opt_tokens.input_ids)], dim=1)
        attention_mask = torch.cat([atts_opt, opt_tokens.attention_mask], dim=1)
        with self.maybe_autocast():
            # With inputs_embeds only, HF returns the new tokens alone.
            outputs = self.opt_model.generate(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.opt_tokenizer.pad_token_id,
                **generate_kwargs,
            )
        return [text.strip() for text in self.opt_tokenizer.batch_decode(outputs, skip_special_tokens=True)]

    @torch.no_grad()
    def generate(
        self,
        samples,
        use_nucleus_sampling=False,
        num_beams=5,
        max_length=30,
        min_length=1,
        top_p=0.9,
        repetition_penalty=1.0,
        length_penalty=1.0,
        num_captions=1,
        temperature=1,
    ):
        """Caption images; returns ``batch_size * num_captions`` strings (image-major order)."""
        image = samples["image"]
        prompt = samples.get("prompt", self.prompt)
        prompts = [prompt] * image.size(0) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != image.size(0):
            raise ValueError(f"got {len(prompts)} prompts for {image.size(0)} images; give one prompt or one per image")
        return self._generate_from_prompts(
            image,
            prompts,
            do_sample=use_nucleus_sampling,
            top_p=top_p,
            temperature=temperature,
            num_beams=1 if use_nucleus_sampling else num_beams,
            max_new_tokens=max_length,
            min_new_tokens=min_length,
            repetition_penalty=repetition_penalty,
            length_penalty=length_penalty,
            num_return_sequences=num_captions,
        )

    @torch.no_grad()
    def predict_answers(
        self,
        samples,
        num_beams=5,
        inference_method="generate",
        max_len=10,
        min_len=1,
        num_ans_candidates=128,
        answer_list=None,
        prompt="",
        length_penalty=0,
        **kwargs,
    ):
        """Open-ended VQA: ``prompt.format(question)`` (when a prompt is given) then generation."""
        if inference_method != "generate":
            raise ValueError(f"inference_method {inference_method!r} is not supported by BLIP-2 OPT; use 'generate'")
        questions = samples["text_input"]
        questions = [questions] if isinstance(questions, str) else list(questions)
        texts = [prompt.format(q) for q in questions] if prompt else questions
        return self._generate_from_prompts(
            samples["image"],
            texts,
            do_sample=False,
            num_beams=num_beams,
            max_new_tokens=max_len,
            min_new_tokens=min_len,
            length_penalty=length_penalty,
        )

    @classmethod
    def from_config(cls, cfg):
        model = cls(
            **vision_kwargs(cfg),
            opt_model=cfg.get("opt_model"),
            prompt=cfg.get("prompt", ""),
            max_txt_len=cfg.get("max_txt_len", 32),
            opt_tokenizer=cfg.get("opt_tokenizer"),
            opt_config=cfg.get("opt_config"),
            freeze_llm=cfg.get("freeze_llm", True),
            llm_precision=cfg.get("llm_precision", "fp16"),
        )
        model.load_checkpoint_from_config(cfg)
        return model
