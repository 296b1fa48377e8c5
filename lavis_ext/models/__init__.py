"""Registers the BLIP-2 models: blip2_opt_ext, blip2_t5_ext, blip2_qformer_ext."""
from lavis_ext import compat as _compat

_compat.apply()  # LAVIS cannot be imported before its shims

from lavis_ext.models.blip2_opt import Blip2OPTExt
from lavis_ext.models.blip2_qformer import Blip2QformerExt
from lavis_ext.models.blip2_t5 import Blip2T5Ext

__all__ = ["Blip2OPTExt", "Blip2T5Ext", "Blip2QformerExt"]
