"""Each shim in lavis_ext.compat: the stock failure it fixes is real, and lavis_ext fixes it."""
from __future__ import annotations

import os
import subprocess
import sys

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
