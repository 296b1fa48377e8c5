"""A lean decode loop for OPT (greedy and beam search) that returns Hugging Face ``generate``'s tokens.

Why: in transformers' ``generate`` over ``OPTForCausalLM`` most of a decode step is Python (profiled on the
256x4 bench model, batch 1: about 85%): ``prepare_inputs_for_generation`` (``inspect.signature`` each step),
the 2D->4D mask rebuilt from the whole attention mask and checked with ``torch.all`` each step, the
``DynamicCache`` bookkeeping, the logits processors and stopping criteria, the ``deprecate_kwarg`` wrappers
of every layer and attention call. This loop runs the same modules with the same arguments and keeps
everything else out of the step:

* the prefix (image queries + prompt) runs once per batch, with the mask Hugging Face would build for it;
  for beam search it runs once per image, not once per beam, and its cache is copied to the beams
  (``repeat_interleave``, as HF expands the inputs);
* the KV cache is preallocated for the whole decode (:class:`StaticKV`: one buffer per layer, written in
  place, no ``torch.cat`` per step); beams reorder it with one ``index_select`` per layer;
* the decode-step mask (0 where attended, the dtype's min at left padding, as HF's) is built once for the
  longest sequence and sliced; with no padding it is ``None`` (SDPA's own path), as HF passes;
* each layer is called through its own attention, layer norms and MLP modules (so LoRA layers injected in
  place still run) with exactly the ops of ``OPTDecoderLayer.forward``, in the same order;
* beam search is HF's vectorised algorithm (top 2k over beams x vocab, length penalty, the
  ``early_stopping=False`` heuristic), with no Python loop over beams or rows.

Supported (else :func:`lean_unsupported` names why and the caller falls back to HF ``generate``): greedy or beam
search without sampling; ``max_new_tokens``, ``min_new_tokens``, ``num_beams``, ``length_penalty``,
``repetition_penalty``, ``num_return_sequences`` (<= beams), one ``eos_token_id``, ``pad_token_id``; the
model's SDPA attention, pre-LayerNorm (every released OPT but 350m), no layer drop at eval, a
``generation_config`` without decoding defaults of its own. Sampling, ``synced_gpus`` (FSDP), other
attention implementations and any other ``generate`` argument go to HF. Flan-T5 keeps HF ``generate`` (not
attempted: an encoder-decoder with relative position bias and cross-attention caches is a second loop to keep
exact; the profile that motivated this one was OPT's). Tokens equal HF's: the same
kernels see the same tensors in the same order (``tests/unit/test_decode.py`` checks greedy and beam 5,
batch 1 and 16, with and without left padding, min/max length edges and early EOS).

Thread safety: nothing here is shared between calls (the cache and masks are per call).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

# generate keyword arguments the lean loop implements (see the module docstring); any other falls back to HF
LEAN_KWARGS = {"do_sample", "num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "repetition_penalty",
               "num_return_sequences", "top_p", "temperature", "eos_token_id", "pad_token_id"}
# generation_config fields a model may carry without changing greedy / beam decoding (token ids come as arguments)
_NEUTRAL_CONFIG = {"bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "transformers_version",
                   "_from_model_config"}
DECODE_IMPLS = ("lean", "hf")


def check_decode_impl(value: str) -> str:
    """``model.decode_impl`` -> itself; raises ValueError naming the bad value and the choices."""
    if value not in DECODE_IMPLS:
        raise ValueError(f"model.decode_impl {value!r}: use one of {', '.join(DECODE_IMPLS)} "
                         "(lean: our OPT decode loop, same tokens; hf: transformers' generate)")
    return value


def lean_unsupported(llm, kwargs: dict) -> str | None:
    """Why the lean loop cannot run ``llm`` with these ``generate`` kwargs (None: it can)."""
    extra = sorted(set(kwargs) - LEAN_KWARGS)
    if extra:
        return f"generate arguments {extra}"
    if kwargs.get("do_sample"):
        return "sampling"
    beams = kwargs.get("num_beams") or 1
    if (kwargs.get("num_return_sequences") or 1) > beams:
        return "num_return_sequences > num_beams"
    if not isinstance(kwargs.get("eos_token_id"), int):
        return "eos_token_id is not one int"
    if not isinstance(kwargs.get("pad_token_id"), int):
        return "pad_token_id is not an int"
    if llm.__class__.__name__ != "OPTForCausalLM" or not hasattr(llm, "model"):
        return f"{llm.__class__.__name__} is not transformers' OPTForCausalLM"
    cfg = llm.config
    if cfg._attn_implementation != "sdpa":
        return f"attention {cfg._attn_implementation!r} (the lean loop calls SDPA)"
    if not cfg.do_layer_norm_before:
        return "post-LayerNorm OPT (350m)"
    if llm.training:
        return "training mode (dropout, layer drop)"
    own = set(llm.generation_config.to_diff_dict()) - _NEUTRAL_CONFIG
    if own:
        return f"generation_config sets {sorted(own)}"
    if kwargs.get("max_new_tokens") is None:
        return "no max_new_tokens"
    return None


class StaticKV:
    """Keys and values of every layer, preallocated for the whole decode and written in place.

    Duck-types the one method ``OPTAttention`` calls on a cache (``update``): it stores the step's keys and
    values at the current length and returns the filled part. A layer's buffers are allocated at its first
    update, in the dtype of its keys (under autocast: the autocast dtype, as HF's cache holds them).
    :meth:`advance` moves the length after a step."""

    def __init__(self, layers: int, max_len: int):
        self.keys: list = [None] * layers
        self.values: list = [None] * layers
        self.max_len = max_len
        self.length = 0

    def update(self, key, value, layer_idx, cache_kwargs=None):
        end = self.length + key.shape[2]
        k, v = self.keys[layer_idx], self.values[layer_idx]
        if k is None:
            rows, heads, _, dim = key.shape
            k = self.keys[layer_idx] = key.new_empty(rows, heads, self.max_len, dim)
            v = self.values[layer_idx] = value.new_empty(rows, heads, self.max_len, value.shape[-1])
        k[:, :, self.length:end] = key
        v[:, :, self.length:end] = value
        # contiguous, as HF's cache hands them: CPU SDPA runs about 2x slower on the strided slices
        return k[:, :, :end].contiguous(), v[:, :, :end].contiguous()

    def advance(self, n: int) -> None:
        self.length += n

    def expand_rows(self, repeats: int) -> None:
        """Each row ``repeats`` times, adjacent (beam search after a prefix computed once per image)."""
        self.keys = [k.repeat_interleave(repeats, dim=0) for k in self.keys]
        self.values = [v.repeat_interleave(repeats, dim=0) for v in self.values]

    def reorder(self, rows: torch.Tensor, start: int = 0) -> None:
        """Row i takes row ``rows[i]``'s keys and values from position ``start`` on (beam search: the prefix,
        the same in every beam of an image, stays where it is)."""
        n = self.length
        for buffers in (self.keys, self.values):
            for t in buffers:
                t[:, :, start:n] = t[:, :, start:n].index_select(0, rows)


def _direct(module):
    """``module``'s forward as the functional call it makes, when it is a plain ``nn.Linear`` / ``nn.LayerNorm``
    / ``nn.ReLU`` without hooks (the same op, less Python per call); otherwise the module itself (LoRA,
    quantised or hooked layers keep their own forward)."""
    if module._forward_hooks or module._forward_pre_hooks or _global_hooks():
        return module
    kind = type(module)
    if kind is nn.Linear:
        return functools.partial(F.linear, weight=module.weight, bias=module.bias)
    if kind is nn.LayerNorm:
        return functools.partial(torch.layer_norm, normalized_shape=module.normalized_shape, weight=module.weight,
                                 bias=module.bias, eps=module.eps, cudnn_enable=torch.backends.cudnn.enabled)
    if kind is nn.ReLU and not module.inplace:
        return torch.relu
    return module


def _global_hooks() -> bool:
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


class _Layer:
    """One ``OPTDecoderLayer`` (eval, SDPA, pre-LayerNorm) resolved to the calls its forward makes."""

    def __init__(self, layer):
        attn = layer.self_attn
        self.ln1, self.ln2 = _direct(layer.self_attn_layer_norm), _direct(layer.final_layer_norm)
        self.q, self.k, self.v, self.o = (_direct(m) for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj))
        self.fc1, self.fc2, self.act = _direct(layer.fc1), _direct(layer.fc2), _direct(layer.activation_fn)
        self.scaling, self.heads, self.head_dim, self.index = attn.scaling, attn.num_heads, attn.head_dim, attn.layer_idx

    def __call__(self, hidden, mask, cache):
        """``OPTDecoderLayer.forward`` + ``OPTAttention.forward`` + transformers' ``sdpa_attention_forward``, op
        for op (dropout is the identity in eval)."""
        bsz, tgt_len, _ = hidden.shape
        residual = hidden
        hidden = self.ln1(hidden)
        query = (self.q(hidden) * self.scaling).view(bsz, -1, self.heads, self.head_dim).transpose(1, 2)
        key = self.k(hidden).view(bsz, -1, self.heads, self.head_dim).transpose(1, 2)
        value = self.v(hidden).view(bsz, -1, self.heads, self.head_dim).transpose(1, 2)
        key, value = cache.update(key, value, self.index)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=1.0,
                                             is_causal=tgt_len > 1 and mask is None)
        out = out.transpose(1, 2).contiguous().reshape(bsz, tgt_len, -1).contiguous()
        hidden = residual + self.o(out)
        shape = hidden.shape
        hidden = hidden.reshape(-1, hidden.size(-1))
        return (hidden + self.fc2(self.act(self.fc1(self.ln2(hidden))))).view(shape)


class _OPTStep:
    """The OPT decoder run layer by layer with our cache and mask: the ops of ``OPTDecoder.forward`` and
    ``OPTForCausalLM.forward`` for an eval-mode, pre-LayerNorm model, in order."""

    def __init__(self, llm):
        dec = llm.model.decoder
        self.embed = dec.embed_tokens
        self.positions = dec.embed_positions.weight
        self.offset = dec.embed_positions.offset
        self.project_in = None if dec.project_in is None else _direct(dec.project_in)
        self.project_out = None if dec.project_out is None else _direct(dec.project_out)
        self.final_ln = None if dec.final_layer_norm is None else _direct(dec.final_layer_norm)
        self.layers = [_Layer(layer) for layer in dec.layers]
        self.lm_head = _direct(llm.lm_head)

    def __call__(self, inputs_embeds, positions, mask, cache: StaticKV, last_only: bool):
        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        hidden = inputs_embeds + F.embedding(positions + self.offset, self.positions)
        for layer in self.layers:
            hidden = layer(hidden, mask, cache)
        cache.advance(inputs_embeds.shape[1])
        if last_only:  # the prefix: only its last position predicts
            hidden = hidden[:, -1:]
        if self.final_ln is not None:
            hidden = self.final_ln(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return self.lm_head(hidden)


def _prefix_mask(attention_mask: torch.Tensor, dtype) -> torch.Tensor | None:
    """The mask HF's OPT gives SDPA for the prefix: None without padding (SDPA's causal path), else the
    additive causal + padding mask of ``OPTDecoder._prepare_4d_causal_attention_mask_with_cache_position``."""
    if bool(attention_mask.all()):
        return None
    from transformers.models.opt.modeling_opt import OPTDecoder

    length = attention_mask.shape[1]
    mask = OPTDecoder._prepare_4d_causal_attention_mask_with_cache_position(
        attention_mask, sequence_length=length, target_length=length, dtype=dtype,
        cache_position=torch.arange(length, device=attention_mask.device), batch_size=attention_mask.shape[0],
    )
    if attention_mask.device.type in ("cuda", "xpu", "npu"):  # as HF: padded query rows attend to everything
        from transformers.modeling_attn_mask_utils import AttentionMaskConverter

        mask = AttentionMaskConverter._unmask_unattended(mask, torch.finfo(dtype).min)
    return mask


def _step_mask(attention_mask: torch.Tensor, total: int, dtype) -> torch.Tensor | None:
    """One decode step's additive mask rows for every length up to ``total`` (slice ``[..., :length]``): 0 on the
    prefix's tokens and every generated one, the dtype's min on left padding; None without padding."""
    if bool(attention_mask.all()):
        return None
    rows, prefix = attention_mask.shape
    mask = torch.zeros(rows, 1, 1, total, dtype=dtype, device=attention_mask.device)
    mask[:, 0, 0, :prefix].masked_fill_(attention_mask == 0, torch.finfo(dtype).min)
    return mask


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """The prefix's position ids as ``generate`` computes them (padding at 1)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill_(attention_mask == 0, 1)


def _process(scores, generated, step, min_new_tokens, eos_token_id, rep_processor):
    """HF's logits processors for these settings, in HF's order: repetition penalty, then min length."""
    if rep_processor is not None and step > 0:
        scores = rep_processor(generated[:, :step], scores)
    if step < min_new_tokens:
        scores = scores.clone()
        scores[:, eos_token_id] = -float("inf")
    return scores


@torch.no_grad()
def opt_generate(llm, inputs_embeds, attention_mask, *, eos_token_id: int, pad_token_id: int, max_new_tokens: int,
                 min_new_tokens: int = 0, num_beams: int = 1, length_penalty: float = 1.0,
                 repetition_penalty: float = 1.0, num_return_sequences: int = 1, **_ignored) -> torch.Tensor:
    """The new tokens ``llm.generate(inputs_embeds=..., attention_mask=..., ...)`` returns for these settings
    (greedy when ``num_beams == 1``), as a ``(rows * num_return_sequences, length)`` tensor.

    ``_ignored``: ``do_sample=False`` and the sampling-only ``top_p`` / ``temperature``, which greedy and beam
    search do not read (check :func:`lean_unsupported` first)."""
    min_new_tokens, num_beams, num_return_sequences = min_new_tokens or 0, num_beams or 1, num_return_sequences or 1
    length_penalty = 1.0 if length_penalty is None else length_penalty  # None: HF's default
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens {max_new_tokens}: give at least 1")
    rep = None
    if repetition_penalty is not None and repetition_penalty != 1.0:
        from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

        rep = RepetitionPenaltyLogitsProcessor(penalty=repetition_penalty)
    step_fn = _OPTStep(llm)
    attention_mask = attention_mask.to(inputs_embeds.device)
    if num_beams == 1:
        return _greedy(step_fn, llm, inputs_embeds, attention_mask, eos_token_id, pad_token_id, max_new_tokens,
                       min_new_tokens, rep)
    return _beam(step_fn, llm, inputs_embeds, attention_mask, eos_token_id, pad_token_id, max_new_tokens,
                 min_new_tokens, rep, num_beams, length_penalty, num_return_sequences)


def _new_cache(llm, max_len) -> StaticKV:
    return StaticKV(llm.config.num_hidden_layers, max_len)


def _greedy(step_fn, llm, embeds, mask, eos, pad, max_new, min_new, rep):
    rows, prefix = mask.shape
    device, dtype = embeds.device, embeds.dtype
    total = prefix + max_new
    cache = _new_cache(llm, total)
    next_pos = mask.long().sum(1, keepdim=True)  # the first generated token's position
    step_mask = _step_mask(mask, total, dtype)
    generated = torch.full((rows, max_new), pad, dtype=torch.long, device=device)
    unfinished = torch.ones(rows, dtype=torch.long, device=device)
    logits = step_fn(embeds, _positions(mask), _prefix_mask(mask, dtype), cache, last_only=True)
    step = 0
    while True:
        # float32 as HF's; no copy of float32 logits (HF copies them for in-place processors; ours return new tensors)
        scores = _process(logits[:, -1, :].float(), generated, step, min_new, eos, rep)
        tokens = torch.argmax(scores, dim=-1)
        tokens = tokens * unfinished + pad * (1 - unfinished)
        generated[:, step] = tokens
        step += 1
        unfinished = unfinished & (tokens != eos).long()
        if step >= max_new or unfinished.max() == 0:
            return generated[:, :step]
        length = prefix + step
        logits = step_fn(step_fn.embed(tokens[:, None]), next_pos + (step - 1), None if step_mask is None
                         else step_mask[..., :length], cache, last_only=False)


def _gather(tensor, index):
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _beam(step_fn, llm, embeds, mask, eos, pad, max_new, min_new, rep, beams, length_penalty, n_return):
    batch, prefix = mask.shape
    device, dtype = embeds.device, embeds.dtype
    rows, total, keep = batch * beams, prefix + max_new, 2 * beams  # HF keeps max(2, 1 + n_eos) * beams
    vocab = llm.config.vocab_size
    # the prefix once per image, then its cache copied to each beam (HF runs it on every beam: same values)
    cache = _new_cache(llm, total)
    logits = step_fn(embeds, _positions(mask), _prefix_mask(mask, dtype), cache, last_only=True)
    cache.expand_rows(beams)
    logits = logits.repeat_interleave(beams, dim=0)
    mask = mask.repeat_interleave(beams, dim=0)
    next_pos = mask.long().sum(1, keepdim=True)
    step_mask = _step_mask(mask, total, dtype)

    fill = pad or eos  # HF's fill value for unused positions
    running = torch.full((batch, beams, max_new), fill, dtype=torch.long, device=device)
    finished = running.clone()
    running_scores = torch.zeros(batch, beams, dtype=torch.float, device=device)
    running_scores[:, 1:] = -1e9
    finished_scores = torch.full((batch, beams), -1e9, dtype=torch.float, device=device)
    finished_len = torch.zeros(batch, beams, dtype=torch.long, device=device)
    is_finished = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=device)
    top_beams = torch.arange(keep, device=device) < beams
    batch_offset = torch.arange(batch, device=device).view(-1, 1) * beams
    step = 0
    while True:
        log_probs = F.log_softmax(logits[:, -1, :].to(copy=True, dtype=torch.float32), dim=-1)
        log_probs = _process(log_probs, running.view(rows, max_new), step, min_new, eos, rep)
        log_probs = (log_probs.view(batch, beams, -1) + running_scores[:, :, None]).view(batch, beams * vocab)
        topk_scores, topk_index = torch.topk(log_probs, k=keep)
        from_beam = topk_index // vocab
        topk_seqs = _gather(running, from_beam)
        tokens = topk_index % vocab
        topk_seqs[:, :, step] = tokens
        hits = (tokens == eos) | (step + 1 >= max_new)  # EOS, or the length limit for all

        # the best beams that go on
        live_scores = topk_scores + hits.to(torch.float32) * -1.0e9
        best = torch.topk(live_scores, k=beams)[1]
        running = _gather(topk_seqs, best)
        running_scores = _gather(live_scores, best)
        reorder = (_gather(from_beam, best) + batch_offset).view(-1)

        # finished hypotheses: kept when among the best so far (HF's _update_finished_beams). Skipped when no
        # top beam finished: HF's merge then only trades -1e9 placeholders for -1e9 candidates, slots that
        # are never returned (a row stops early only when all its slots hold finished hypotheses).
        just_done = hits & top_beams[None, :]
        if bool(just_done.any()):
            done_scores = topk_scores / ((step + 1) ** length_penalty)
            done_scores = done_scores + (~improvable).to(torch.float32) * -1.0e9
            done_scores = done_scores + (~just_done) * -1.0e9
            merged_scores = torch.cat((finished_scores, done_scores), dim=1)
            pick = torch.topk(merged_scores, k=beams)[1]
            finished = _gather(torch.cat((finished, topk_seqs), dim=1), pick)
            finished_scores = _gather(merged_scores, pick)
            finished_len = _gather(torch.cat((finished_len, torch.full_like(tokens, step + 1)), dim=1), pick)
            is_finished = _gather(torch.cat((is_finished, just_done), dim=1), pick)

        step += 1
        # early_stopping=False: stop a row when its best running beam cannot beat its worst finished one
        best_running = running_scores[:, :1] / (step ** length_penalty)
        worst_done = torch.where(is_finished, torch.min(finished_scores, dim=1, keepdim=True)[0], -1.0e9)
        improvable = improvable & torch.any(best_running > worst_done, dim=-1, keepdim=True)
        if not bool(improvable.any()) or bool(hits.all()):
            break
        cache.reorder(reorder, start=prefix)  # beams move within their image: its prefix is theirs already
        length = prefix + step
        logits = step_fn(step_fn.embed(running[:, :, step - 1].reshape(rows, 1)), next_pos + (step - 1),
                         None if step_mask is None else step_mask[..., :length], cache, last_only=False)
    out_len = int(finished_len[:, :n_return].max())
    return finished[:, :n_return, :out_len].reshape(batch * n_return, out_len)
