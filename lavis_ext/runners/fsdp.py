"""FSDP for the LLM-heavy variants (Flan-T5-XXL): ``run.fsdp: true`` shards parameters, gradients and
optimizer state across ranks with PyTorch's ``fully_shard`` (FSDP2), on GPU (nccl) and on CPU (gloo).

Units: every transformer block of the LLM, of the ViT and of the Q-Former is its own unit (gathered just
before it runs, freed after); the rest (embeddings, projections, query tokens, LayerNorms, LM head) forms
the root unit. ``generate`` and ``predict_answers`` are registered as forward methods so evaluation
gathers the root as ``forward`` does, and Hugging Face ``generate`` runs with ``synced_gpus`` so ranks
whose sequences finish early keep joining the all-gathers of the others.

FSDP keeps one storage dtype per unit, so the model is stored in fp32 (``model.llm_precision: fp32``,
``model.vit_precision: fp32``: a mixed model is refused before training with that fix) and computes in
``run.fsdp_param_dtype`` (bf16 on GPU by default: FSDP's mixed-precision policy casts each gathered unit;
gradients are reduced in fp32). The fp32 shards cost 4 bytes per parameter / world size.

Checkpoints stay in our format (full, unsharded tensors): each sharded tensor is gathered on every rank
(a collective, so every rank takes part in a save) and rank 0 writes; loading reads the full tensor and
keeps each rank's own shard.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from lavis_ext.models.llm_specs import spec_of
from lavis_ext.precision import parse_dtype
from lavis_ext.runners.compile import towers

logger = logging.getLogger(__name__)

FORWARD_METHODS = ("generate", "predict_answers")


def enabled(run_cfg) -> bool:
    return bool(run_cfg.get("fsdp", False))


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that become their own FSDP units: LLM layers, ViT blocks, Q-Former layers."""
    blocks: list[nn.Module] = []
    found = towers(model)
    spec = spec_of(model)
    if spec is not None:
        blocks += spec.blocks(found[spec.attr])
    if hasattr(found.get("visual_encoder"), "blocks"):
        blocks += list(found["visual_encoder"].blocks)
    if "Qformer.bert" in found:
        blocks += list(found["Qformer.bert"].encoder.layer)
    return blocks


def _compute_dtype(run_cfg, device: torch.device) -> torch.dtype | None:
    """What FSDP casts each gathered unit to: ``run.fsdp_param_dtype``, else bf16 for an amp run on a GPU."""
    name = run_cfg.get("fsdp_param_dtype")
    if name is None:
        return torch.bfloat16 if device.type == "cuda" and run_cfg.get("amp", False) else None
    dtype = parse_dtype(name, "run.fsdp_param_dtype")
    return None if dtype == torch.float32 else dtype


def check_storage_dtype(model: nn.Module) -> None:
    """FSDP gathers a unit's parameters in one flat buffer: one dtype per model, fp32 here."""
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(
            f"run.fsdp needs the model stored in fp32, it holds {sorted(str(d) for d in dtypes)}; set "
            "model.llm_precision=fp32 and model.vit_precision=fp32 (computation still runs in "
            "run.fsdp_param_dtype, bf16 on GPU by default)"
        )


def shard(model: nn.Module, run_cfg, device: torch.device) -> nn.Module:
    """Shard ``model`` in place (its class becomes an FSDP module); returns it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    check_storage_dtype(model)
    # Each rank built (and seeded) its own copy; DDP broadcasts rank 0's weights, fully_shard does not.
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            torch.distributed.broadcast(tensor.data, src=0)
    world = torch.distributed.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    compute = _compute_dtype(run_cfg, device)
    policy = MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.float32) if compute else MixedPrecisionPolicy()
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    for name in FORWARD_METHODS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    model.fsdp_sharded = True  # read by generation: Hugging Face generate needs synced_gpus
    logger.info("FSDP over %d ranks: %d block units + the root, compute dtype %s", world, len(blocks),
                compute or torch.float32)
    return model
