"""Test setup. Triton's interpreter must be chosen before anything imports triton, hence at the very top."""

import os

try:
    import torch

    _has_gpu = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_gpu = False
if not _has_gpu:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib
import pathlib

import pytest

# The parity fixtures made by the real libraries (soft-moe, soft-moe-pytorch) ship in the repository, so a plain
# clone runs the parity tests; ../shared/fixtures, where they were made, is checked against them when present
# (test_fixtures_match_the_shared_copy).
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
SHARED_FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for a module of tiny models: on a shared 2-core CPU, thread hand-offs cost more than
    the work (6 ViT forwards took 1 s on 2 threads), and a healing run is bit-reproducible for one thread count.
    Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if _has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def importable(name: str) -> bool:
    """Whether a module imports here (a capability test modules gate their tests on)."""
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def perturbed_layer(E: int, S: int, D: int, H: int, kind: str = "gelu_mlp", scale: float = 4.0):
    """A Soft MoE layer in eval mode with non-trivial parameters everywhere (biases start at zero) and a sharper
    router scale, so that subsets matter; seed torch first for a fixed one."""
    from moe_prune.core.layers import SoftMoE, SoftMoEConfig

    m = SoftMoE(SoftMoEConfig(dim=D, num_experts=E, slots_per_expert=S, hidden=H, expert=kind)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        m.scale.fill_(scale)
    return m
