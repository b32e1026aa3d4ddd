"""Triton's CPU interpreter (``TRITON_INTERPRET=1``), made to run this package's kernels on every supported triton.

The interpreter holds a scalar kernel argument as a one-element array. When such a scalar bounds a
loop (``for k in range(0, hidden_size, BLOCK_K)``), triton 3.6's interpreter converts it with
``int(array)``, which NumPy 2.4 and newer refuse for an array that is not 0-dimensional ("only
0-dimensional arrays can be converted to Python scalars"): every log-probs kernel failed under
triton 3.6 (the GPU machine's version) with a current NumPy. Newer interpreters squeeze the array
first; ``patch_interpreter`` gives the older ones that conversion. Compiled kernels (CUDA) never
see this module's change: it only touches the interpreter, and only when it has the old conversion.
"""

from __future__ import annotations

import inspect
import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Launch options of every kernel of the package: FMA contraction on, as in every measurement of them.
# Triton 3.10 turns it off by default, and 3.9 warns at each process's first launch that relies on
# the default.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
_OLD_INDEX = "int(self.handle.data))"


def _index(self) -> int:
    return int(self.handle.data.squeeze())


def patch_interpreter() -> bool:
    """Squeeze before ``int`` in the interpreter's ``tensor.__index__``; True when it was needed (idempotent)."""
    if not INTERPRET:
        return False
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "squeezes_index", False):
        return False
    try:
        old = _OLD_INDEX in inspect.getsource(original)
    except (OSError, TypeError):
        return False
    if not old:
        return False

    def _patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    _patch_lang_tensor.squeezes_index = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True
