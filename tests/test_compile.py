"""torch.compile(fullgraph=True) takes the Soft MoE layer with per-input (Algorithm 1) and per-batch (Algorithm 2)
subsets: no host synchronisation and no Python loop over experts in a call (what CUDA graphs need too), and the
compiled layer computes what eager does."""

import pytest
import torch

from moe_prune.core.experts import CPU_POLICY, set_policy
from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.selection.scores import with_experts, with_selection

pytestmark = pytest.mark.usefixtures("one_thread")


def _layer(**kw):
    torch.manual_seed(0)
    layer = SoftMoE(SoftMoEConfig(dim=16, num_experts=8, slots_per_expert=2, hidden=24, **kw)).eval()
    layer.use_triton = False
    return layer


CASES = {  # every eager path an Algorithm 1 or 2 call can take, forced by the execution policy
    "per input, gathered": ("input", dict(row_gather_limit=1 << 40)),
    "per input, padded": ("input", dict(row_gather_limit=0, loop_overhead=None, padded_capacity="batch")),
    "per batch, gathered": ("batch", dict(gather_limit=1 << 40)),
    "per batch, large experts": ("batch", dict(gather_limit=0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["drop", "renorm"])
def test_fullgraph_compile_matches_eager(case, mode):
    per, policy = CASES[case]
    layer = set_policy(_layer(), CPU_POLICY, **policy)
    model = with_selection(layer, "1/4", per=per, mode=mode)
    x = torch.randn(5, 11, 16)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # a graph break would raise
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)


def test_fullgraph_compile_of_a_compressed_layer_and_a_static_subset():
    layer = _layer(held=(0, 2, 3, 5, 6))
    for model in (with_selection(layer, 2, per="input"), with_experts(layer, torch.tensor([2, 5]))):
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        x = torch.randn(3, 7, 16)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), atol=1e-6, rtol=1e-5)
