"""One backend vocabulary and one resolver for every op, and the one error for a backend that cannot run.

Every op takes ``backend=`` among ``auto``, ``triton`` (CUDA; CPU tensors under
``TRITON_INTERPRET=1``), ``cpp`` (the compiled CPU op) and ``reference`` (plain torch, always
there). ``auto`` is ``triton`` for CUDA tensors and ``cpp`` for CPU ones. Errors: ``TypeError``
for a wrong type, ``ValueError`` for a bad value, ``BackendUnavailableError`` for a backend that
exists but cannot run here.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "cpp", "reference")


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run on this machine, device or input; the message says what it needs."""


def resolve_backend(
    op: str,
    backend: str,
    device: torch.device | str,
    supports: tuple[str, ...] = BACKENDS,
    *,
    names: tuple[str, ...] = BACKENDS,
    host_order: tuple[str, ...] = ("cpp",),
) -> str:
    """The concrete backend of ``op`` for tensors on ``device``.

    Args:
        op: the op's name, for messages.
        backend: one of ``names``.
        device: where the op's tensors live.
        supports: the concrete backends the op has (a host-only op has no ``triton``).
        names: the vocabulary ``backend`` is checked against (``auto`` first); the paged attention
            ops add ``torch``.
        host_order: what ``auto`` picks off CUDA, the first of these the op supports (the last one
            when it supports none).
    """
    if not isinstance(backend, str):
        raise TypeError(f"{op}: backend must be a string, got {type(backend).__name__}")
    if backend not in names or (backend != "auto" and backend not in supports):
        allowed = tuple(name for name in names if name == "auto" or name in supports)
        raise ValueError(f"{op}: backend must be one of {allowed}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda" and "triton" in supports:
            return "triton"
        return next((name for name in host_order if name in supports), host_order[-1])
    if backend == "cpp" and device.type != "cpu":
        raise BackendUnavailableError(f"{op}: backend 'cpp' runs on CPU tensors, got tensors on {device}")
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendUnavailableError(
            f"{op}: backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got tensors on {device}"
        )
    return backend
