"""run.fsdp's checks that run before any process group exists (the sharded runs are in e2e/test_distributed.py)."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from tiny_models import tiny_model

from lavis_ext.runners import fsdp


@pytest.mark.parametrize("arch,llm_blocks", [("blip2_opt_ext", 2), ("blip2_t5_ext", 4)])
def test_every_transformer_block_is_its_own_unit(synthetic_root, arch, llm_blocks):
    model = tiny_model(arch)
    blocks = fsdp.transformer_blocks(model)
    vit, qformer = len(model.visual_encoder.blocks), len(model.Qformer.bert.encoder.layer)
    assert len(blocks) == llm_blocks + vit + qformer
    assert len({id(b) for b in blocks}) == len(blocks)


def test_a_model_not_stored_in_fp32_is_refused_with_the_fix(synthetic_root):
    model = tiny_model("blip2_opt_ext")
    model.opt_model.half()
    with pytest.raises(ValueError, match="model.llm_precision=fp32"):
        fsdp.check_storage_dtype(model)
    fsdp.check_storage_dtype(tiny_model("blip2_opt_ext"))


def test_compute_dtype_choice():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fsdp._compute_dtype(OmegaConf.create({}), cpu) is None
    assert fsdp._compute_dtype(OmegaConf.create({"amp": True}), cuda) == torch.bfloat16
    assert fsdp._compute_dtype(OmegaConf.create({"fsdp_param_dtype": "fp16"}), cpu) == torch.float16
    with pytest.raises(ValueError, match="fsdp_param_dtype 'int8'"):
        fsdp._compute_dtype(OmegaConf.create({"fsdp_param_dtype": "int8"}), cpu)
