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


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests, then the previous count back (it is process-wide).

    The tiny rollout models are latency-bound; more threads only add contention on the shared
    machine. Request it with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
