"""The compiled extension: its ops are registered, and a missing build fails with a how-to."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import anytime_kernels


def test_ops_are_registered_with_the_dispatcher():
    for name in ("pack_response_trees", "token_advantages", "brpo_advantages", "fused_logprobs_forward",
                 "fused_logprobs_backward"):  # fmt: skip
        assert hasattr(torch.ops.anytime_kernels, name), name


def test_import_without_built_extension_says_how_to_build(tmp_path):
    package = Path(anytime_kernels.__file__).parent
    copy = tmp_path / "anytime_kernels"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    # An editable install adds a meta-path finder that would still find the real build; drop it.
    code = (
        "import sys; sys.meta_path = [f for f in sys.meta_path if '__editable__' not in repr(f)]; "
        "import anytime_kernels"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "ImportError" in result.stderr
    assert "pip install --no-build-isolation -e ." in result.stderr
