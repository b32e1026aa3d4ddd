"""Triton's CPU interpreter runs the kernels on the oldest supported triton (``anytime_kernels._interpreter``).

Triton 3.6's interpreter converted a loop-bounding scalar with ``int(one_element_array)``, which
NumPy >= 2.4 refuses; every log-probs kernel failed there. ``make test-compat`` runs the whole suite
under triton 3.6; these tests hold the patch itself to a stand-in of the old interpreter code.
"""

from __future__ import annotations

import operator
import types

import numpy as np
import pytest
import torch

from anytime_kernels import _interpreter


class _Scope:
    """The interpreter's patch scope: records what it replaced, restores it in reverse."""

    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def restore(self):
        while self.changes:
            obj, name, original = self.changes.pop()
            if original is None:
                delattr(obj, name)
            else:
                setattr(obj, name, original)


def _old_patch_lang_tensor(tensor, scope):  # what triton 3.6 does
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data))


def _stand_in_tensor(value):
    class Tensor:
        pass

    item = Tensor()
    item.handle = types.SimpleNamespace(data=np.array([value]))
    return Tensor, item


def test_old_interpreter_index_is_patched_to_take_one_element_arrays(monkeypatch):
    interpreter = pytest.importorskip("triton.runtime.interpreter")
    monkeypatch.setattr(_interpreter, "INTERPRET", True)
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_patch_lang_tensor)
    tensor_type, item = _stand_in_tensor(7)

    scope = _Scope()
    _old_patch_lang_tensor(tensor_type, scope)
    if np.lib.NumpyVersion(np.__version__) >= "2.4.0":
        with pytest.raises(TypeError, match="0-dimensional"):
            operator.index(item)  # the failure the patch is for
    scope.restore()

    assert _interpreter.patch_interpreter() is True
    assert _interpreter.patch_interpreter() is False  # once is enough
    scope = _Scope()
    interpreter._patch_lang_tensor(tensor_type, scope)
    assert operator.index(item) == 7
    assert list(range(0, item, 3)) == [0, 3, 6]
    scope.restore()
    assert "__index__" not in tensor_type.__dict__  # the interpreter's restore undoes both layers


def test_patch_leaves_compiled_kernels_and_new_interpreters_alone(monkeypatch):
    interpreter = pytest.importorskip("triton.runtime.interpreter")

    def new_patch_lang_tensor(tensor, scope):  # newer tritons squeeze first
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    monkeypatch.setattr(interpreter, "_patch_lang_tensor", new_patch_lang_tensor)
    monkeypatch.setattr(_interpreter, "INTERPRET", True)
    assert _interpreter.patch_interpreter() is False
    assert interpreter._patch_lang_tensor is new_patch_lang_tensor
    monkeypatch.setattr(interpreter, "_patch_lang_tensor", _old_patch_lang_tensor)
    monkeypatch.setattr(_interpreter, "INTERPRET", False)  # compiled (CUDA) kernels: nothing to patch
    assert _interpreter.patch_interpreter() is False
    assert interpreter._patch_lang_tensor is _old_patch_lang_tensor


@pytest.mark.skipif(not _interpreter.INTERPRET, reason="runs the kernel under TRITON_INTERPRET=1 (set without CUDA)")
def test_kernel_loop_bounded_by_a_scalar_argument_runs_under_the_interpreter():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    import anytime_kernels.logprobs_triton  # noqa: F401  (applies the patch, as every kernel module does)

    @triton.jit
    def block_sums(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            acc += tl.load(x_ptr + offsets, mask=offsets < n, other=0.0)
        tl.store(out_ptr + tl.arange(0, BLOCK), acc)

    x = torch.arange(20, dtype=torch.float32)
    out = torch.empty(8)
    block_sums[(1,)](x, out, 20, BLOCK=8)
    # Lane j sums x[j], x[j + 8] and (j < 4) x[j + 16].
    expected = torch.tensor([j + (j + 8) + (j + 16 if j < 4 else 0) for j in range(8)], dtype=torch.float32)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
