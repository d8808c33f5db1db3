import os
import sys

import pytest
import torch

# Nothing in the suite may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# transformers >= 5.25 loads Hub kernels by default (the `kernels` package): the references here are plain transformers.
os.environ["USE_HUB_KERNELS"] = "NO"
# Without a GPU the Triton kernels run in Triton's interpreter (must be set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests choose backends explicitly; a value left in the developer's shell must not leak in.
os.environ.pop("MOETUNE_MOE_BACKEND", None)
# torch's metadata check of every recomputed tensor, off in moetune's checkpoint for its host time, on in the suite.
os.environ["MOETUNE_CHECK_RECOMPUTE"] = "1"
# Under pytest-xdist (the README's `-n auto`) the workers already fill the cores: one thread each, for the CLI
# subprocesses too (the environment variable), so N workers do not run N x cores threads, and a run in a worker
# and one in a subprocess it starts (the resume tests compare their losses bitwise) use the same thread count.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_launch_decisions():
    """grouped_gemm memoises autotuning's decisions per process; tests fake its answers (autotune.pick, the ways
    offered), so each test starts and ends without decisions (ending: a faked answer must not reach the fixtures
    of the next test either)."""

    def forget():
        module = sys.modules.get("moetune.kernels.grouped_gemm")
        if module is not None:
            module.forget_decisions()

    forget()
    yield
    forget()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
