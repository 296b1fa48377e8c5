"""Stage-1 BLIP-2 (Q-Former with ITC/ITM/ITG) built through our component hooks.

LAVIS's `Blip2Qformer.__init__` calls `init_tokenizer`, `init_vision_encoder` and `init_Qformer`
through `self`, so only the config plumbing is ours. It needs a process group even with one
process (`dist.get_rank()` in `forward`): `lavis_ext.dist.init_distributed` always creates one.
"""
from __future__ import annotations

from types import MappingProxyType

from lavis.common.registry import registry
from lavis.models.blip2_models.blip2_qformer import Blip2Qformer

from lavis_ext.models.components import Blip2ComponentsMixin, vision_kwargs, with_options
from lavis_ext.models.model_types import lavis_model_types, tiny_config_path
from lavis_ext.models.strategies import finish_from_config


@registry.register_model("blip2_qformer_ext")
class Blip2QformerExt(Blip2ComponentsMixin, Blip2Qformer):
    PRETRAINED_MODEL_CONFIG_DICT = {
        **lavis_model_types(Blip2Qformer),
        "tiny": tiny_config_path("blip2_qformer_tiny.yaml"),
    }
    # every model.* key this class reads, with its default: the shared ones (lavis_ext.models.components; no LLM
    # key) and the width of the ITC projections
    model_options = MappingProxyType({**Blip2ComponentsMixin.model_options, "embed_dim": 256})

    def __init__(self, components=None, **kwargs):
        self._remember_components(components)
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg):
        opts = cls.options(cfg)
        model = cls(**vision_kwargs(opts), embed_dim=opts["embed_dim"], max_txt_len=opts["max_txt_len"])
        return finish_from_config(model, with_options(cfg, opts))
