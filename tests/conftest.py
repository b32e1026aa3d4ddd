"""Test configuration: Triton runs under its CPU interpreter when there is no CUDA device.

TRITON_INTERPRET must be set before triton is first imported, so it happens here, at collection
time, before any test module imports the kernels. Tests that need CUDA carry the `gpu` marker and
are reported as skipped without it.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (gpu marker); none is visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"
