"""Captioning and VQA generation shared by BLIP-2 OPT and Flan-T5.

LAVIS's `generate` passes `max_length`, which on current transformers counts the query embeddings and
the prompt (LAVIS#707: captions collapse or fail), and BLIP-2 OPT in 1.0.2 has no `predict_answers`.
Both models implement ``encode_image_for_llm`` (image -> LLM prefix) and
``generate_from_llm_inputs(prefix, mask, prompts, **hf_generate_kwargs)``; the methods here turn LAVIS's
arguments into Hugging Face ones with ``max_new_tokens`` only.

Besides ``image``, ``samples`` may carry the image side already computed, so that callers can reuse it:
``image_embeds`` (the ViT features from ``encode_vision``: several questions about one image) or
``llm_inputs`` (the finished prefix, e.g. from the ONNX image encoder; only for models without
``qformer_text_input``, whose prefix does not depend on the question).

The decode itself goes through :meth:`Blip2GenerationMixin.llm_generate`: ``model.decode_impl: lean`` (the
default) runs OPT's greedy and beam search in :mod:`lavis_ext.models.decode` (Hugging Face's tokens, less Python
per step); every other case (sampling, FSDP, Flan-T5, ``decode_impl: hf``) runs transformers' ``generate``.
Prompts are tokenised through a per-tokenizer cache (:meth:`Blip2GenerationMixin.prompt_tokens`): the constant
caption prompt is tokenised once, and the padding side is an argument, never tokenizer state, so serving
threads can share the model.
"""
from __future__ import annotations

import threading
import weakref

import torch

from lavis_ext.models.decode import lean_unsupported, opt_generate

PROMPT_CACHE_SIZE = 4096  # distinct prompt strings kept per tokenizer (VQA questions vary; captions use one)
_PROMPT_IDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # tokenizer -> {prompt: ids}
_PROMPT_LOCK = threading.Lock()


class Blip2GenerationMixin:
    """Mix in before the LAVIS class: LAVIS's `generate` / `predict_answers` signatures."""

    decode_impl = "lean"  # ``model.decode_impl`` (lavis_ext.models.decode.check_decode_impl): lean | hf

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
        batch_size = _batch_size(samples)
        prompt = samples.get("prompt", self.prompt)
        prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        if len(prompts) != batch_size:
            raise ValueError(f"got {len(prompts)} prompts for {batch_size} images; give one prompt or one per image")
        return self._generate_from_prompts(
            samples,
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
        length_penalty=-1,
        **kwargs,
    ):
        """Open-ended VQA: ``prompt.format(question)`` (when a prompt is given) then generation."""
        if inference_method != "generate":
            raise ValueError(f"inference_method {inference_method!r} is not supported by BLIP-2; use 'generate'")
        questions = samples["text_input"]
        questions = [questions] if isinstance(questions, str) else list(questions)
        texts = [prompt.format(q) for q in questions] if prompt else questions
        answers = self._generate_from_prompts(
            samples,
            texts,
            qformer_text=samples.get("question", questions),
            do_sample=False,
            num_beams=num_beams,
            max_new_tokens=max_len,
            min_new_tokens=min_len,
            length_penalty=length_penalty,
        )
        return self._postprocess_answers(answers)

    def _generate_from_prompts(self, samples, prompts, qformer_text=None, **generate_kwargs):
        if "llm_inputs" in samples:
            if getattr(self, "qformer_text_input", False) and qformer_text is not None:
                raise ValueError(
                    "llm_inputs cannot be reused with qformer_text_input: the prefix depends on the question; "
                    "pass image_embeds (from encode_vision) instead"
                )
            llm_inputs = samples["llm_inputs"]
            llm_atts = torch.ones(llm_inputs.size()[:-1], dtype=torch.long, device=llm_inputs.device)
        else:
            llm_inputs, llm_atts = self.encode_image_for_llm(
                samples.get("image"), qformer_text, image_embeds=samples.get("image_embeds")
            )
        if getattr(self, "fsdp_sharded", False):
            # ranks whose sequences end early keep joining the others' all-gathers (lavis_ext.runners.fsdp)
            generate_kwargs.setdefault("synced_gpus", torch.distributed.get_world_size() > 1)
        return self.generate_from_llm_inputs(llm_inputs, llm_atts, prompts, **generate_kwargs)

    def _postprocess_answers(self, answers):
        return answers

    def llm_generate(self, llm, inputs_embeds, attention_mask, **generate_kwargs):
        """``llm.generate(inputs_embeds=..., attention_mask=..., **generate_kwargs)``'s output ids, through the lean
        loop where it applies (``decode_impl: lean`` and :func:`lavis_ext.models.decode.lean_unsupported` finds
        nothing against it), else through transformers."""
        if self.decode_impl == "lean" and lean_unsupported(llm, generate_kwargs) is None:
            return opt_generate(llm, inputs_embeds, attention_mask, **generate_kwargs)
        return llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)

    def prompt_tokens(self, tokenizer, prompts, padding_side: str):
        """``tokenizer(prompts, padding="longest", padding_side=...)``'s ``(input_ids, attention_mask)``, each
        distinct prompt tokenised once per tokenizer (the caption prompt is the same on every call). Equal to the
        tokenizer's batch output (``tests/unit/test_decode.py``). The cache lives outside the model (a lock in the
        model would break ``copy.deepcopy``) and is locked; the tokenizer is only read."""
        prompts = list(prompts)
        with _PROMPT_LOCK:
            cache = _PROMPT_IDS.setdefault(tokenizer, {})
            missing = [p for p in dict.fromkeys(prompts) if p not in cache]
        if missing:
            ids = tokenizer(missing).input_ids
            with _PROMPT_LOCK:
                if len(cache) + len(missing) > PROMPT_CACHE_SIZE:
                    cache.clear()
                cache.update(zip(missing, ids))
        with _PROMPT_LOCK:
            rows = [cache.get(p) for p in prompts]
        if any(r is None for r in rows):  # evicted by a concurrent call in between: tokenise this batch directly
            rows = tokenizer(prompts).input_ids
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        return input_ids, attention_mask


def _batch_size(samples) -> int:
    for key in ("llm_inputs", "image_embeds", "image"):
        if samples.get(key) is not None:
            return samples[key].size(0)
    raise KeyError("samples need 'image' (or the cached 'image_embeds' / 'llm_inputs')")
