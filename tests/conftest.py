"""Test configuration. Runs before flashloss is imported anywhere:
- FLASHLOSS_POISON=1: every kernel output starts as NaN (DESIGN.md §6), so unwritten elements fail.
- TRITON_INTERPRET=1 on machines without CUDA: Triton kernels run on CPU tensors (tests marked
  `interpret`). On a GPU machine Triton compiles for the GPU instead, and the `interpret` tests
  run in a separate `TRITON_INTERPRET=1 pytest -m interpret` pass (bench/gpu_all.sh does both).
"""
import os
import sys

os.environ.setdefault("FLASHLOSS_POISON", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    no_cuda = pytest.mark.skip(reason="needs a CUDA device (run bench/gpu_all.sh on a GPU machine)")
    no_interp = pytest.mark.skip(
        reason="Triton compiles for the GPU in this process; run `TRITON_INTERPRET=1 pytest -m interpret`")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if "interpret" in item.keywords and os.environ.get("TRITON_INTERPRET") != "1":
            item.add_marker(no_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
