"""Loads the compiled extension, whose import registers ``torch.ops.anytime_kernels.*``."""

import torch

try:
    from anytime_kernels import _C  # noqa: F401  (import registers the ops)
except ImportError as error:
    raise ImportError(
        "anytime_kernels._C, the compiled extension, is not built or does not match the installed "
        f"torch {torch.__version__} ({error}). Build it from the repository root with "
        "`pip install --no-build-isolation -e .` (or `make install`), after installing torch."
    ) from error

ops = torch.ops.anytime_kernels
