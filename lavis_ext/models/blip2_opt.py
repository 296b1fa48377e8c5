"""BLIP-2 with an OPT decoder, on Hugging Face's current `OPTForCausalLM`.

Why not LAVIS's `Blip2OPT.__init__`: it builds LAVIS's vendored `modeling_opt.OPTForCausalLM`, which
has no `.generate` under transformers >= 4.50 (`AttributeError: 'OPTForCausalLM' object has no
attribute 'generate'`), always loads fp16 weights from a hub name, and always freezes the LLM. Our
``__init__`` builds the same attributes (so LAVIS's `forward` runs unchanged) from the hooks in
:mod:`lavis_ext.models.components`. `generate` feeds ``inputs_embeds`` to :mod:`lavis_ext.models.decode`
(greedy, beam: transformers' tokens with less Python per step) or to HF generation (nucleus,
``decode_impl: hf``), and `predict_answers` (absent in 1.0.2) makes OPT usable for VQA.
"""
from __future__ import annotations


import torch
import torch.nn as nn
from lavis.common.registry import registry
from lavis.models.blip2_models.blip2 import Blip2Base
from lavis.models.blip2_models.blip2_opt import Blip2OPT

from lavis_ext.models.answers import expand_answers, weighted_sequence_loss
from lavis_ext.models.decode import check_decode_impl
from lavis_ext.models.generation import Blip2GenerationMixin
from lavis_ext.models.components import (
    Blip2ComponentsMixin, env_path, llm_kwargs, llm_model_options, vision_kwargs, with_options,
)
from lavis_ext.models.llm_specs import OPT
from lavis_ext.models.model_types import lavis_model_types, tiny_config_path
from lavis_ext.models.strategies import finish_from_config


@registry.register_model("blip2_opt_ext")
class Blip2OPTExt(Blip2ComponentsMixin, Blip2GenerationMixin, Blip2OPT):
    """BLIP-2 OPT. Real types keep LAVIS's names (``pretrain_opt2.7b``, ``caption_coco_opt2.7b``, ...);
    ``tiny`` is the CPU-sized model trained by ``make demo``."""

    PRETRAINED_MODEL_CONFIG_DICT = {
        **lavis_model_types(Blip2OPT),
        "tiny": tiny_config_path("blip2_opt_tiny.yaml"),
    }
    # every model.* key this class reads, with its default (lavis_ext.models.components): the shared ones, the LLM
    # ones, opt_model / opt_tokenizer / opt_config, and OPT's decode loop: lean (ours, lavis_ext.models.decode) | hf
    model_options = llm_model_options(OPT, decode_impl=Blip2GenerationMixin.decode_impl)

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
        llm_precision=None,  # the family default (LLMSpec.default_storage: fp16)
        cross_attention_freq=2,
        components=None,
        qformer_text_input=False,
        llm_quantization=None,  # an LLMQuantization (model.llm_quantization keys): 8/4-bit LLM weights
    ):
        self._remember_components(components)
        Blip2Base.__init__(self)  # skip Blip2OPT.__init__ (see module docstring)

        self.max_txt_len = max_txt_len  # the Q-Former's question tokenizer reads it
        self._build_vision_and_qformer(
            vit_model, img_size, drop_path_rate, use_grad_checkpoint, vit_precision, freeze_vit,
            num_query_token, cross_attention_freq, qformer_text_input,
        )

        self.opt_tokenizer, self.opt_model = OPT.build(
            env_path(opt_model), env_path(opt_tokenizer), opt_config, OPT.storage_dtype(llm_precision),
            llm_quantization,
        )
        if freeze_llm:
            for param in self.opt_model.parameters():
                param.requires_grad = False
        # A caption ends at the first "\n" (LAVIS's convention for OPT).
        self.eos_token_id = self.opt_tokenizer("\n", add_special_tokens=False).input_ids[0]

        self.opt_proj = nn.Linear(self.Qformer.config.hidden_size, self.opt_model.config.hidden_size)
        self.prompt = prompt
        prompt_tokens = self.opt_tokenizer(self.prompt, return_tensors="pt")
        self.prompt_length = prompt_tokens.attention_mask.sum(1)

    # ---- shared image path ----------------------------------------------------------------------
    def encode_image_for_llm(self, image: torch.Tensor | None = None, questions=None, image_embeds=None):
        """Image or its ``encode_vision`` features (and question, see ``qformer_text_input``) -> query
        embeddings in the LLM's space (the prefix OPT reads before the prompt), mask."""
        inputs_opt = self.opt_proj(self.encode_queries(image, questions, image_embeds))
        atts_opt = torch.ones(inputs_opt.size()[:-1], dtype=torch.long, device=inputs_opt.device)
        return inputs_opt, atts_opt

    def _prefixed_embeds(self, queries: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The query prefix then the token embeddings, in the LLM's dtype (call inside its autocast)."""
        embed = self.opt_model.get_input_embeddings()
        return torch.cat([queries.to(embed.weight.dtype), embed(input_ids)], dim=1)

    # ---- training -------------------------------------------------------------------------------
    def forward(self, samples):
        """Captioning batches (``text_input`` only) train as LAVIS does: the model prompt, then the
        caption. VQA batches (with ``text_output``) train the answer after the prompted question, with
        every distinct answer weighted by its votes (:mod:`lavis_ext.models.answers`)."""
        if "text_output" not in samples:
            return {"loss": self._caption_loss(samples)}
        return {"loss": self._answer_loss(samples)}

    def _caption_loss(self, samples):
        """LAVIS's captioning loss, op for op: the prompt then the caption and "\n", the loss skipping the
        prompt and the padding. Ours because LAVIS's forward wraps the LLM in its forced-fp16 autocast,
        where the precision module must decide (:mod:`lavis_ext.precision`)."""
        image = samples["image"]
        inputs_opt, atts_opt = self.encode_image_for_llm(image)
        opt_tokens = self.opt_tokenizer(
            [t + "\n" for t in samples["text_input"]], return_tensors="pt", padding="longest", padding_side="right",
            truncation=True, max_length=self.max_txt_len,
        ).to(image.device)
        targets = opt_tokens.input_ids.masked_fill(opt_tokens.input_ids == self.opt_tokenizer.pad_token_id, -100)
        if self.prompt:
            targets[:, : self.prompt_length] = -100
        no_targets = torch.full(atts_opt.size(), -100, dtype=torch.long, device=image.device)
        attention_mask = torch.cat([atts_opt, opt_tokens.attention_mask], dim=1)
        with self.maybe_autocast(block=self.opt_model):
            inputs_embeds = self._prefixed_embeds(inputs_opt, opt_tokens.input_ids)
            outputs = self.opt_model(
                inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True,
                labels=torch.cat([no_targets, targets], dim=1),
            )
        return outputs.loss

    def _answer_loss(self, samples):
        image = samples["image"]
        targets, weights, index = expand_answers(samples)
        inputs_opt, atts_opt = self.encode_image_for_llm(image, samples.get("question", samples["text_input"]))
        prompts = self.opt_tokenizer([samples["text_input"][i] for i in index], add_special_tokens=True).input_ids
        # The answer follows the prompt after a space and ends at "\n", as generation stops there.
        answers = self.opt_tokenizer([f" {t}\n" for t in targets], add_special_tokens=False).input_ids
        pad = self.opt_tokenizer.pad_token_id
        rows = [(p + a)[: self.max_txt_len] for p, a in zip(prompts, answers)]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for j, (row, prompt) in enumerate(zip(rows, prompts)):
            input_ids[j, : len(row)] = torch.tensor(row)
            labels[j, len(prompt): len(row)] = torch.tensor(row[len(prompt):], dtype=torch.long)
        input_ids, labels = input_ids.to(image.device), labels.to(image.device)
        text_mask = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in rows])[:, None]).long().to(image.device)

        queries = inputs_opt[index]
        attention_mask = torch.cat([atts_opt[index], text_mask], dim=1)
        with self.maybe_autocast(block=self.opt_model):
            inputs_embeds = self._prefixed_embeds(queries, input_ids)
            logits = self.opt_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, return_dict=True).logits
        # position t predicts token t + 1; the query positions predict nothing
        logits = logits[:, queries.size(1) - 1 : -1]
        if weights is None:
            weights = torch.ones(len(targets))
        return weighted_sequence_loss(logits, labels, weights, num_questions=len(samples["text_input"]))

    def generate_from_llm_inputs(self, inputs_opt, atts_opt, prompts, **generate_kwargs):
        """Decode from the image prefix (``encode_image_for_llm``, or an exported image encoder's output)
        followed by each prompt; Hugging Face ``generate`` keyword arguments pass through."""
        # the side as an argument, not a tokenizer attribute: the tokenizer is shared by concurrent serving threads
        input_ids, prompt_mask = self.prompt_tokens(self.opt_tokenizer, prompts, OPT.generate_padding_side)
        input_ids, prompt_mask = input_ids.to(inputs_opt.device), prompt_mask.to(inputs_opt.device)
        attention_mask = torch.cat([atts_opt, prompt_mask], dim=1)
        with self.maybe_autocast(block=self.opt_model):
            inputs_embeds = self._prefixed_embeds(inputs_opt, input_ids)
            # With inputs_embeds only, HF returns the new tokens alone (and so does the lean loop).
            outputs = self.llm_generate(
                self.opt_model,
                inputs_embeds,
                attention_mask,
                eos_token_id=self.eos_token_id,
                pad_token_id=self.opt_tokenizer.pad_token_id,
                **generate_kwargs,
            )
        return [text.strip() for text in self.opt_tokenizer.batch_decode(outputs, skip_special_tokens=True)]

    @classmethod
    def from_config(cls, cfg):
        opts = cls.options(cfg)
        model = cls(**vision_kwargs(opts), **llm_kwargs(opts, cfg, OPT), max_txt_len=opts["max_txt_len"])
        model.decode_impl = check_decode_impl(opts["decode_impl"])
        return finish_from_config(model, with_options(cfg, opts))
