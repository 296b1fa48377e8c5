"""Each shim in lavis_ext.compat: the stock failure it fixes is real, and lavis_ext fixes it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lavis.common.registry import registry


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_stock_lavis_import_fails_without_the_transformers_shim():
    proc = run_python("import lavis")
    assert proc.returncode != 0
    assert "cannot import name 'apply_chunking_to_forward'" in proc.stderr


def test_lavis_imports_after_lavis_ext():
    proc = run_python("import lavis_ext; lavis_ext.register(); import lavis.models.blip2_models.Qformer, lavis.models.med; print('ok')")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok")


def test_stock_import_registers_no_lr_scheduler_or_runner():
    code = (
        "import transformers.modeling_utils as m, transformers.pytorch_utils as p\n"
        "for n in ('apply_chunking_to_forward','find_pruneable_heads_and_indices','prune_linear_layer'): setattr(m, n, getattr(p, n))\n"
        "import lavis\n"
        "from lavis.common.registry import registry\n"
        "print(registry.get_lr_scheduler_class('linear_warmup_cosine_lr'), registry.get_runner_class('runner_base'))\n"
    )
    proc = run_python(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "None None"


def test_lavis_ext_registers_schedulers_and_runners():
    assert registry.get_lr_scheduler_class("linear_warmup_cosine_lr") is not None
    assert registry.get_lr_scheduler_class("linear_warmup_step_lr") is not None
    assert registry.get_runner_class("runner_iter") is not None


def test_cache_root_is_redirected_away_from_export():
    from lavis_ext.compat import default_cache_root

    assert registry.get_path("cache_root") == str(default_cache_root())
    assert not registry.get_path("cache_root").startswith("/export")


def test_cache_root_follows_env(tmp_path):
    code = "import lavis_ext; lavis_ext.register(); from lavis.common.registry import registry; print(registry.get_path('cache_root'))"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=300, env={**os.environ, "LAVIS_EXT_CACHE": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(tmp_path)


def test_tensors_registered_on_meta_only_in_the_entering_thread_and_only_inside_the_block():
    """The meta-build patch: this thread's modules land on meta (ties kept, values of factory tensors still
    readable); a module built meanwhile in another thread stays on CPU; afterwards torch is as before."""
    import threading

    import torch
    import torch.nn as nn

    from lavis_ext import compat

    original = nn.Module.register_parameter
    entered, built = threading.Event(), threading.Event()
    other = {}

    def build_elsewhere():
        entered.wait(10)
        other["linear"] = nn.Linear(3, 3)
        built.set()

    thread = threading.Thread(target=build_elsewhere)
    thread.start()
    with compat.tensors_registered_on("meta"):
        rates = [x.item() for x in torch.linspace(0, 0.1, 3)]  # LAVIS's ViT reads these while it builds
        head = nn.Linear(4, 4)
        tied = nn.Linear(4, 4)
        tied.weight = head.weight
        entered.set()
        built.wait(10)
    thread.join(10)
    assert rates[-1] == pytest.approx(0.1)
    assert head.weight.device.type == "meta" and head.bias.device.type == "meta" and tied.weight is head.weight
    assert other["linear"].weight.device.type == "cpu"
    assert nn.Module.register_parameter is original and nn.Linear(2, 2).weight.device.type == "cpu"
