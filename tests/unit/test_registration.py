"""`lavis_ext.register()` registers everything and imports nothing optional, `import lavis_ext` alone nothing at
all, and bad names fail loudly."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

import pytest
from lavis.common.registry import registry
from omegaconf import OmegaConf

from lavis_ext.config import ConfigError, check_names

REPO_PROJECT = "projects/tiny/caption_opt.yaml"


def test_everything_is_registered():
    from lavis_ext.runners import RunnerBaseExt

    for arch in ("blip2_opt_ext", "blip2_t5_ext", "blip2_qformer_ext"):
        assert registry.get_model_class(arch) is not None, arch
    for builder in ("wds_caption", "wds_vqa"):
        assert registry.get_builder_class(builder) is not None, builder
    for task in ("captioning_ext", "vqa_ext"):
        assert registry.get_task_class(task) is not None, task
    assert registry.get_runner_class("runner_base") is RunnerBaseExt
    assert registry.get_runner_class("runner_base_lavis").__name__ == "RunnerBase"


def test_real_model_types_are_kept_with_tiny_added():
    opt = registry.get_model_class("blip2_opt_ext").PRETRAINED_MODEL_CONFIG_DICT
    t5 = registry.get_model_class("blip2_t5_ext").PRETRAINED_MODEL_CONFIG_DICT
    for name in ("pretrain_opt2.7b", "pretrain_opt6.7b", "caption_coco_opt2.7b", "caption_coco_opt6.7b", "tiny"):
        assert name in opt
    for name in ("pretrain_flant5xl", "pretrain_flant5xxl", "caption_coco_flant5xl", "tiny"):
        assert name in t5
    cfg = OmegaConf.load(opt["caption_coco_opt2.7b"]).model
    assert cfg.opt_model == "facebook/opt-2.7b" and cfg.finetuned.startswith("https://")


def fresh_python(*lines: str) -> str:
    """The last line a fresh interpreter prints after running ``lines``."""
    proc = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip().splitlines()[-1]


def test_register_pulls_in_nothing_optional():
    assert fresh_python(
        "import sys, lavis_ext",
        "lavis_ext.register(); lavis_ext.register()  # idempotent",
        "print([m for m in ('fastapi','uvicorn','gradio','onnx','onnxruntime','langchain_core','tensorrt') if m in sys.modules])",
    ) == "[]"


def test_metrics_and_the_batcher_import_without_lavis_or_torch():
    """A scoring script or an HTTP front end needs neither LAVIS nor torch (nor their shims)."""
    assert fresh_python(
        "import sys, lavis_ext, lavis_ext.evaluation, lavis_ext.evaluation.cider, lavis_ext.serve.batching",
        "loaded = [n for n in ('lavis', 'torch', 'transformers') if n in sys.modules]",
        "import transformers.modeling_utils as m",
        "print(loaded, hasattr(m, 'apply_chunking_to_forward'))",
    ) == "[] False"  # no LAVIS, torch or transformers loaded; no shim applied


def _project(**overrides):
    cfg = OmegaConf.load(REPO_PROJECT)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))


def test_valid_project_passes():
    check_names(_project())


@pytest.mark.parametrize(
    "override, bad, suggestion",
    [
        ({"model.arch": "blip2_opt_extt"}, "blip2_opt_extt", "blip2_opt_ext"),
        ({"model.model_type": "tinyy"}, "tinyy", "tiny"),
        ({"run.task": "captioning_exp"}, "captioning_exp", "captioning_ext"),
        ({"run.runner": "runner_bse"}, "runner_bse", "runner_base"),
        ({"run.lr_sched": "linear_warmup_cosine"}, "linear_warmup_cosine", "linear_warmup_cosine_lr"),
        ({"datasets.wds_caption.vis_processor.train.name": "blip_image_evl"}, "blip_image_evl", "blip_image_eval"),
    ],
)
def test_unknown_names_fail_naming_value_and_close_matches(override, bad, suggestion):
    with pytest.raises(ConfigError) as err:
        check_names(_project(**override))
    assert repr(bad) in str(err.value) and repr(suggestion) in str(err.value)


def test_unknown_builder_fails():
    cfg = _project()
    cfg.datasets = {"wds_captoin": {}}
    with pytest.raises(ConfigError, match="wds_caption"):
        check_names(cfg)


def test_model_type_option_loads_that_types_defaults():
    """LAVIS bug: `--options model.model_type=X` kept the project type's defaults under X's name."""
    from argparse import Namespace

    from lavis_ext.config import project_config

    args = Namespace(cfg_path=str(REPO_PROJECT), options=["model.model_type=pretrain_opt2.7b"])
    model = project_config(args).model_cfg
    assert model.model_type == "pretrain_opt2.7b"
    assert model.opt_model == "facebook/opt-2.7b" and model.image_size == 224
    # none of the tiny type's defaults survive (the project file's own vit_config does, as any explicit key would)
    assert "qformer_config" not in model and "opt_config" not in model and "opt_tokenizer" not in model
    plain = project_config(Namespace(cfg_path=str(REPO_PROJECT), options=None)).model_cfg
    assert plain.model_type == "tiny" and plain.vit_model == "tiny"


def test_importing_the_runners_changes_no_lavis_name_until_register():
    """LAVIS's `runner_base` means our runner only once `register()` binds it (not as an import side effect)."""
    assert fresh_python(
        "import lavis_ext.runners",
        "from lavis.common.registry import registry",
        "before = registry.get_runner_class('runner_base').__name__",
        "lavis_ext.register()",
        "print(before, registry.get_runner_class('runner_base').__name__, registry.get_runner_class('runner_iter').__name__)",
    ) == "RunnerBase RunnerBaseExt RunnerIterExt"


@pytest.mark.parametrize("section,key,arch,task", [
    ("model", "t5_model", "blip2_opt_ext", "captioning_ext"),       # the other LLM family's key
    ("model", "freeze_llm", "blip2_qformer_ext", "retrieval_ext"),  # a stage-1 model has no LLM
    ("model", "decode_impl", "blip2_t5_ext", "captioning_ext"),     # OPT's decode loop: Flan-T5 never reads it
    ("model", "apply_lemmatizer", "blip2_opt_ext", "vqa_ext"),      # Flan-T5's OK-VQA lemmatizer
    ("model", "embed_dim", "blip2_opt_ext", "captioning_ext"),      # stage 1's ITC width
    ("run", "k_test", "blip2_opt_ext", "captioning_ext"),           # retrieval's option in a captioning run
    ("run", "constant_baseline", "blip2_opt_ext", "vqa_ext"),       # captioning's option in a VQA run
])
def test_keys_are_checked_against_the_chosen_class(section, key, arch, task):
    from lavis_ext.config import check_keys

    cfg = OmegaConf.create({"run_cfg": {"task": task}, "model_cfg": {"arch": arch}, "datasets_cfg": {}})
    cfg[f"{section}_cfg"][key] = 1
    expected = (rf"run.{key} is an option of tasks? .*'\w+', not of '{task}'; remove it" if section == "run"
                else rf"model\.{key} is a key of archs? .*'\w+', not of '{arch}'; remove it")
    with pytest.raises(ConfigError, match=expected):
        check_keys(cfg)
    other = {"t5_model": ("blip2_t5_ext", task), "freeze_llm": ("blip2_opt_ext", task),
             "decode_impl": ("blip2_opt_ext", task), "apply_lemmatizer": ("blip2_t5_ext", task),
             "embed_dim": ("blip2_qformer_ext", "retrieval_ext"),
             "k_test": (arch, "retrieval_ext"), "constant_baseline": (arch, "captioning_ext")}[key]
    cfg.model_cfg.arch, cfg.run_cfg.task = other
    check_keys(cfg)  # valid where the class reads it


def test_a_run_prompt_on_a_vqa_task_names_the_one_owner():
    from lavis_ext.config import check_keys

    cfg = OmegaConf.create({"run_cfg": {"task": "vqa_ext", "prompt": "Question: {} Answer:"},
                            "model_cfg": {"arch": "blip2_opt_ext"}, "datasets_cfg": {}})
    with pytest.raises(ConfigError, match=r"run.prompt is not an option of task 'vqa_ext': the dataset applies .*datasets.<name>.prompt"):
        check_keys(cfg)


@pytest.mark.parametrize("builder,key,expected,valid_on", [
    # a VQA builder's question prompt on a caption builder: the caption prompt is the text processor's
    ("wds_caption", "prompt", r"datasets.wds_caption.prompt is a key of builders .*'wds_vqa'.*; a caption prompt "
                              r"belongs to the text processor", "wds_vqa"),
    # the shard reader's keys on a JSON-file builder
    ("json_caption", "shuffle_buffer", r"datasets.json_caption.shuffle_buffer is a key of builders 'wds_caption', "
                                       r"'wds_vqa', not of 'json_caption'; remove it", "wds_caption"),
    ("wds_vqa", "decode_cache_mbs", r"unknown dataset key 'decode_cache_mbs' at datasets.wds_vqa.decode_cache_mbs "
                                    r"\(builder 'wds_vqa'\); did you mean 'decode_cache_mb'", None),
])
def test_dataset_keys_are_checked_against_the_chosen_builder(builder, key, expected, valid_on):
    from lavis_ext.config import check_keys

    cfg = OmegaConf.create({"run_cfg": {"task": "captioning_ext"}, "model_cfg": {"arch": "blip2_opt_ext"},
                            "datasets_cfg": {builder: {key: 1}}})
    with pytest.raises(ConfigError, match=expected):
        check_keys(cfg)
    if valid_on:
        cfg.datasets_cfg = {valid_on: {key: 1, "sample_ratio": 1}}
        check_keys(cfg)  # valid where the builder reads it


def test_a_builders_option_defaults_are_stated_once_and_read_through_it(synthetic_root):
    """The default YAML states no dataset option: the builder class's ``dataset_options`` is the one source, the
    project's value wins over it, and inference reads the prompt a run trained with from the same place."""
    from lavis.common.registry import registry

    from lavis_ext.inference import _question_prompt

    vqa = registry.get_builder_class("wds_vqa")
    defaults = OmegaConf.load(vqa.default_config_path()).datasets.wds_vqa
    assert not set(defaults) & set(vqa.dataset_options)
    builder = vqa(OmegaConf.merge(defaults, {"build_info": {"root": str(synthetic_root)}, "shuffle_buffer": 7,
                                                 "decode_cache_mb": 0}))
    assert builder.option("shuffle_buffer") == 7 and builder.option("prompt") == vqa.dataset_options["prompt"]
    datasets = builder.build_datasets()
    assert datasets["train"].shuffle_buffer == 7 and datasets["train"].decode_cache_bytes == 0
    assert datasets["val"].prompt == vqa.dataset_options["prompt"]
    config = OmegaConf.create({"model": {"arch": "blip2_opt_ext"}, "datasets": {"wds_vqa": {}}})
    assert _question_prompt(config) == vqa.dataset_options["prompt"]
    config.datasets.wds_vqa.prompt = "Q: {} A:"
    assert _question_prompt(config) == "Q: {} A:"


# ---- model keys: each class's model_options ----------------------------------------------------------
MODEL_ARCHS = ("blip2_opt_ext", "blip2_t5_ext", "blip2_qformer_ext")


class _Recording(Mapping):
    """A model config that notes every key read from it (``get``, ``[]``, ``in``)."""

    def __init__(self, cfg, seen: set):
        self._cfg, self._seen = cfg, seen

    def __getitem__(self, key):
        self._seen.add(key)
        return self._cfg[key]

    def get(self, key, default=None):
        self._seen.add(key)
        return self._cfg.get(key, default)

    def __contains__(self, key):
        self._seen.add(key)
        return key in self._cfg

    def __iter__(self):
        return iter(self._cfg)

    def __len__(self):
        return len(self._cfg)


@pytest.mark.parametrize("arch", MODEL_ARCHS)
def test_every_model_key_a_class_reads_is_in_its_model_options(arch, synthetic_root, monkeypatch):
    """Built from its tiny config, a class reads no model key it does not declare: neither ``from_config`` nor the
    strategy code it ends with (which gets a plain copy, so its reads are recorded where it is called)."""
    from lavis_ext.models import strategies
    from tiny_models import tiny_config

    cls = registry.get_model_class(arch)
    read, strategy_read = set(), set()
    apply = strategies.apply_training_strategy
    monkeypatch.setattr(strategies, "apply_training_strategy",
                        lambda model, cfg: apply(model, _Recording(cfg, strategy_read)))
    cls.from_config(_Recording(tiny_config(arch), read))
    assert read and read <= set(cls.model_options), sorted(read - set(cls.model_options))
    undeclared = strategy_read - set(cls.model_options)
    # the strategy code reads the LLM keys of every model, to refuse them where there is no LLM
    assert undeclared == ({"lora_llm", "llm_grad_checkpoint"} if arch == "blip2_qformer_ext" else set())
    for key in sorted(undeclared):
        with pytest.raises(ValueError, match=f"{key} is set but Blip2QformerExt has no language model"):
            cls.from_config(tiny_config(arch, **{key: {"r": 2} if key == "lora_llm" else True}))


def test_model_defaults_are_stated_once_and_read_through_options(synthetic_root):
    """``options({})`` holds the defaults ``from_config`` used before they moved there, and a model built without
    those keys gets them."""
    from tiny_models import tiny_config

    opt, t5, qformer = (registry.get_model_class(arch) for arch in MODEL_ARCHS)
    defaults = opt.options({})
    assert {k: defaults[k] for k in ("decode_impl", "max_txt_len", "prompt", "freeze_llm", "cross_attention_freq",
                                     "vit_model", "vit_precision", "freeze_vit", "qformer_text_input")} == {
        "decode_impl": "lean", "max_txt_len": 32, "prompt": "", "freeze_llm": True, "cross_attention_freq": 2,
        "vit_model": "eva_clip_g", "vit_precision": "fp16", "freeze_vit": True, "qformer_text_input": False}
    assert t5.options({})["apply_lemmatizer"] is False and qformer.options({})["embed_dim"] == 256
    # the shared keys are stated once, in the components mixin, and every class takes them as they are there
    from lavis_ext.models.components import Blip2ComponentsMixin

    shared = Blip2ComponentsMixin.model_options
    for cls in (opt, t5, qformer):
        assert {k: cls.model_options[k] for k in shared} == dict(shared)
    assert opt.options({"max_txt_len": 9, "unknown": 1}) == {**defaults, "max_txt_len": 9}

    cfg = tiny_config("blip2_opt_ext")
    for key in ("prompt", "max_txt_len", "freeze_llm"):
        cfg.pop(key)
    model = opt.from_config(cfg)
    assert model.prompt == "" and model.max_txt_len == 32 and model.decode_impl == "lean"
    assert not any(p.requires_grad for p in model.opt_model.parameters())  # freeze_llm's default


def test_model_option_asks_the_arch_and_falls_back_for_lavis_classes():
    from lavis_ext.config import model_option

    assert model_option({"arch": "blip2_opt_ext"}, "image_size") == 224
    assert model_option({"arch": "blip2_opt_ext", "image_size": 64}, "image_size") == 64
    assert model_option({"arch": "blip2_qformer_ext"}, "embed_dim") == 256
    assert model_option({"arch": "blip2_opt"}, "max_txt_len") == 32  # LAVIS's own class: the shared default
    with pytest.raises(KeyError, match=r"model.prompt is not a model option of 'blip2_qformer_ext'"):
        model_option({"arch": "blip2_qformer_ext"}, "prompt")


def test_a_misspelt_model_key_names_the_closest_valid_ones_and_lavis_classes_stay_permissive():
    from lavis_ext.config import check_keys, model_keys_for

    cfg = OmegaConf.create({"run_cfg": {"task": "captioning_ext"},
                            "model_cfg": {"arch": "blip2_opt_ext", "frezee_vit": 1}, "datasets_cfg": {}})
    expected = r"unknown model key 'frezee_vit' at model\.frezee_vit \(arch 'blip2_opt_ext'\); did you mean 'freeze_vit'"
    with pytest.raises(ConfigError, match=expected):
        check_keys(cfg)
    # LAVIS's own classes declare no model_options: every key one of ours reads
    assert model_keys_for("blip2_opt") == set().union(*(registry.get_model_class(a).model_options for a in MODEL_ARCHS))
    cfg.model_cfg = {"arch": "blip2_opt", "t5_model": 1, "embed_dim": 1}
    check_keys(cfg)
