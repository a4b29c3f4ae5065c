"""The fused routing kernel against its torch reference (under TRITON_INTERPRET=1 on a machine without a GPU).

Every launch writes into outputs poisoned with NaN, so an element the kernel skips fails the test. Shapes are not
multiples of the tiles (M in 1, 33, 197; D = 40, 196; N = 7*3, 16*1, 130*1), and the two-pass paths are reached
both with the shipped tiles (N=130 > 128 slots, M=300 > 256 tokens) and with 16x16 tiles on small shapes.

Every input of the reference cases has real tokens (a random mask pads about 30% of them, never all); an input
whose every token is padded is its own case (`test_fully_padded_input`), beside a real one in the same batch.
The invariants (each slot's dispatch weights sum to 1 over tokens, each real token's combine weights to 1 over
slots, an input's scores to its real-token count) use tolerances derived from the dtype's rounding, which a
softmax over the wrong axis exceeds by orders of magnitude.

On a machine with a GPU the tensors are on CUDA and the kernel is compiled for it (conftest.py sets
TRITON_INTERPRET=1 only without a GPU); tests marked `gpu` run only there.
"""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from moe_prune.kernels.routing import expert_scores_ref, soft_moe_routing, soft_moe_routing_ref
from moe_prune.kernels.launch import routing_config
from moe_prune.core.layers import SoftMoE, SoftMoEConfig
from moe_prune.core.routing import routing_ref  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The interpreter runs the kernel on CPU tensors; a compiled kernel needs CUDA tensors.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# The kernel is compared with the reference in fp32 on the same (rounded) inputs: it accumulates in fp32, so what
# is left is the rounding of its 16-bit outputs and of the 16-bit tl.dot operands (tokens times gain).
TOL = {
    torch.float32: dict(atol=1e-6, rtol=1e-5),
    torch.float16: dict(atol=5e-4, rtol=5e-3),
    torch.bfloat16: dict(atol=4e-3, rtol=2e-2),
}
SCORE_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=5e-3),
}


def weights(layer, x, mask=None):
    """The full dispatch and combine weights [B, M, E*S] of one routed call."""
    r = layer.route(x, mask)
    return r.dispatch_weights, r.combine_weights


def make_inputs(B, M, D, E, S, dtype, *, scale=True, gain=False, mask=False, token_norm="l2", pad_first=False):
    """Random inputs on DEVICE. mask: about 30% of the tokens padded, every input keeping real ones;
    pad_first: input 0 has every token padded (uniform dispatch, zero combine, zero scores)."""
    x = torch.randn(B, M, D).to(dtype)  # [B, M, D]
    phi = (torch.randn(D, E, S) / D**0.5).to(dtype)  # [D, E, S]
    keep = None
    if mask:
        keep = torch.rand(B, M) > 0.3  # [B, M]
        keep[:, torch.randint(M, (1,))] = True  # every input keeps a real token
        if pad_first:
            keep[0, :] = False
    kw = dict(
        scale=(torch.tensor([3.0]) if scale else None),
        gain=(torch.rand(D) + 0.5 if gain else None),
        mask=keep,
        token_norm=token_norm,
    )
    for key in ("scale", "gain"):
        if kw[key] is not None:
            kw[key] = kw[key].to(dtype)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    return x.to(DEVICE), phi.to(DEVICE), kw


def run_kernel(x, phi, kw, config=None, slots_per_expert=1):
    """The kernel, writing into NaN-poisoned outputs; fails if any element stays unwritten."""
    B, M, _ = x.shape
    N = phi[0].numel()
    S = phi.shape[2] if phi.dim() == 3 else slots_per_expert
    out = (torch.full((B, M, N), float("nan"), dtype=x.dtype, device=x.device),
           torch.full((B, M, N), float("nan"), dtype=x.dtype, device=x.device),
           torch.full((B, N // S), float("nan"), device=x.device))
    dispatch, combine, scores = soft_moe_routing(x, phi, kw["scale"], kw["gain"], token_norm=kw["token_norm"],
                                                 mask=kw["mask"], slots_per_expert=slots_per_expert, out=out,
                                                 config=config)
    assert all(t is o for t, o in zip((dispatch, combine, scores), out))
    for name, t in (("dispatch", dispatch), ("combine", combine), ("scores", scores)):
        assert torch.isfinite(t).all(), f"{name}: {int((~torch.isfinite(t)).sum())} elements not written"
    return dispatch, combine, scores


def reference_fp32(x, phi, kw, slots_per_expert=1):
    f = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    return soft_moe_routing_ref(x.float(), phi.float(), f["scale"], f["gain"], token_norm=f["token_norm"],
                                mask=f["mask"], slots_per_expert=slots_per_expert)


def check_against_reference(x, phi, kw, config=None, slots_per_expert=1):
    dispatch, combine, scores = run_kernel(x, phi, kw, config, slots_per_expert)
    ref_d, ref_c, ref_s = reference_fp32(x, phi, kw, slots_per_expert)
    tol, score_tol = TOL[x.dtype], SCORE_TOL[x.dtype]
    torch.testing.assert_close(dispatch.float(), ref_d, **tol)
    torch.testing.assert_close(combine.float(), ref_c, **tol)
    torch.testing.assert_close(scores, ref_s, **score_tol)
    check_invariants(dispatch, combine, scores, kw["mask"])
    return dispatch, combine, scores


def sum_tolerances(dtype, M, N) -> tuple[float, float]:
    """(atol of a softmax's sum to 1, atol of an input's scores summed over experts), from rounding alone.

    A weight is written in `dtype`: each element rounded by at most eps/2 of itself, so a column or row of
    positive weights that sums to 1 in fp32 sums to 1 within eps/2 once rounded (2 eps: margin). The fp32
    softmax itself and the fp32 sums here add at most a few fp32 eps per term (2 * (M + N) * eps32). Scores are
    summed in fp32 from the combine weights as stored (rounded to `dtype`, as torch sums its own): M rows, each 1
    within the first tolerance.
    A softmax over the wrong axis gives sums of M / N or N / M (or 1 / N at M = 1): far outside both.
    """
    eps, eps32 = torch.finfo(dtype).eps, torch.finfo(torch.float32).eps
    row = 2 * eps + 2 * (M + N) * eps32
    return row, M * row + 1e-6


def check_invariants(dispatch, combine, scores, mask):
    """Each slot's dispatch weights sum to 1 over tokens, each real token's combine weights to 1 over slots (a
    padded token's to 0), an input's scores to its real-token count."""
    B, M, N = combine.shape
    keep = mask if mask is not None else torch.ones(B, M, dtype=torch.bool, device=combine.device)
    sum_atol, score_atol = sum_tolerances(dispatch.dtype, M, N)
    torch.testing.assert_close(dispatch.float().sum(1), torch.ones(B, N, device=dispatch.device), atol=sum_atol, rtol=0)
    torch.testing.assert_close(combine.float().sum(2), keep.float(), atol=sum_atol, rtol=0)
    torch.testing.assert_close(scores.sum(1), keep.float().sum(1), atol=score_atol, rtol=0)


# -- the kernel against the reference ----------------------------------------------------------------------------

SHAPES = [  # (B, M, D, E, S)
    (2, 1, 40, 7, 3),
    (2, 33, 40, 7, 3),
    (2, 197, 196, 16, 1),  # ViT token count; D not a multiple of BLOCK_D
    (2, 33, 40, 130, 1),  # N=130 > 128: combine in two passes with the shipped tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_M{}_D{}_E{}_S{}".format(*s))
def test_kernel_matches_reference(shape, dtype):
    x, phi, kw = make_inputs(*shape, dtype, scale=True, gain=True, mask=True)
    check_against_reference(x, phi, kw)


@pytest.mark.parametrize(
    "features",
    [
        dict(scale=False),  # Phi used as it is
        dict(token_norm="none"),
        dict(token_norm="none", scale=False, gain=True),
        dict(mask=True),
    ],
    ids=["no_scale", "norm_none", "norm_none_gain_no_scale", "mask_only"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: DTYPE_NAMES[d])
def test_kernel_features(features, dtype):
    x, phi, kw = make_inputs(2, 33, 40, 7, 3, dtype, **features)
    check_against_reference(x, phi, kw)


def test_two_pass_dispatch_with_shipped_tiles():
    """M=300 > 256 tokens: dispatch in two passes (online column statistics, then recompute); real tokens."""
    x, phi, kw = make_inputs(2, 300, 40, 16, 2, torch.float32, gain=True, mask=True)
    assert kw["mask"].sum(1).min() > 0
    check_against_reference(x, phi, kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: DTYPE_NAMES[d])
@pytest.mark.parametrize("M", [1, 33])
def test_two_pass_both_softmaxes_small_tiles(M, dtype):
    """16x16 tiles: both softmaxes take two passes over several blocks, with partial last blocks."""
    x, phi, kw = make_inputs(2, M, 40, 7, 3, dtype, gain=True, mask=True)
    cfg = dataclasses.replace(routing_config(DTYPE_NAMES[dtype], None, M, 21), row_m=16, row_n=16, col_m=16,
                              col_n=16, one_pass_rows=False, one_pass_cols=False)
    check_against_reference(x, phi, kw, config=cfg)


def test_sm75_fma_config_for_fp16():
    """The configuration sm_75 gets for fp16 (FMA tiles, BLOCK_D=16) gives the same results."""
    x, phi, kw = make_inputs(2, 33, 40, 7, 3, torch.float16, gain=True, mask=True)
    cfg = routing_config("fp16", (7, 5), 33, 21)
    assert not cfg.tensor_cores and cfg.block_d == 16
    check_against_reference(x, phi, kw, config=cfg)


def test_strided_inputs_and_flat_phi():
    """x not contiguous (a [M, B, D] buffer seen as [B, M, D]), phi given as [D, N] with slots_per_expert."""
    x_mbd = torch.randn(33, 2, 40, device=DEVICE)
    x = x_mbd.transpose(0, 1)  # [B, M, D], strides (40, 80, 1)
    phi = torch.randn(40, 21, device=DEVICE)  # [D, E*S]
    kw = dict(scale=torch.tensor([2.0], device=DEVICE), gain=None, mask=None, token_norm="l2")
    assert not x.is_contiguous()
    check_against_reference(x, phi, kw, slots_per_expert=3)


@pytest.mark.parametrize("M", [33, 197, 300])  # one tile; the ViT count; two dispatch passes with the shipped tiles
def test_fully_padded_input(M):
    """Input 0 has every token padded: uniform dispatch (the finfo.min floor), zero combine and scores; input 1
    beside it has real tokens and must not be affected."""
    x, phi, kw = make_inputs(2, M, 40, 7, 3, torch.float32, gain=True, mask=True, pad_first=True)
    assert kw["mask"][0].sum() == 0 and kw["mask"][1].sum() > 0
    dispatch, combine, scores = check_against_reference(x, phi, kw)
    torch.testing.assert_close(dispatch[0], torch.full_like(dispatch[0], 1 / M))
    assert combine[0].abs().sum() == 0 and scores[0].abs().sum() == 0
    assert scores[1].sum() > 0 and not torch.allclose(dispatch[1], torch.full_like(dispatch[1], 1 / M))


def test_top_experts_follow_from_scores():
    """The batch aggregate and its top-k come from scores alone and agree with the reference's."""
    x, phi, kw = make_inputs(4, 33, 40, 16, 1, torch.float32, gain=True)
    _, _, scores = run_kernel(x, phi, kw)
    _, _, ref_scores = reference_fp32(x, phi, kw)
    torch.testing.assert_close(scores.sum(0), ref_scores.sum(0), **SCORE_TOL[torch.float32])
    assert torch.equal(scores.sum(0).topk(4).indices, ref_scores.sum(0).topk(4).indices)


def test_layer_triton_path_matches_torch_path():
    """SoftMoE.routing through the kernel (use_triton=True) equals its torch path."""
    layer = SoftMoE(SoftMoEConfig(dim=40, num_experts=7, slots_per_expert=3, hidden=16, token_gain=True)).to(DEVICE)
    x = torch.randn(2, 33, 40, device=DEVICE)
    mask = torch.rand(2, 33, device=DEVICE) > 0.2
    with torch.no_grad():
        layer.use_triton = False
        ref = weights(layer, x, mask)
        layer.use_triton = True
        out = weights(layer, x, mask)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, **TOL[torch.float32])


def test_model_forward_and_selection_through_the_kernel():
    """The whole layer, its scores and Algorithm 1/2 selection: the kernel path gives the torch path's results."""
    from moe_prune.selection.scores import expert_scores, select_experts, with_selection

    layer = SoftMoE(SoftMoEConfig(dim=24, num_experts=8, slots_per_expert=1, hidden=16)).eval().to(DEVICE)
    x = torch.randn(3, 17, 24, device=DEVICE)
    results = {}
    with torch.no_grad():
        for flag in (False, True):
            layer.use_triton = flag
            scores = expert_scores(layer, x)
            results[flag] = (layer(x), scores, select_experts(scores, "1/4", per="batch"),
                             with_selection(layer, "1/4", per="batch")(x), with_selection(layer, 2, per="input")(x))
    for a, b in zip(results[True], results[False]):
        if a.dtype == torch.long:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **TOL[torch.float32])


def _counting_kernel(monkeypatch):
    """Replace the kernel `SoftMoE.route` launches by its torch reference, counting the calls (a real launch at
    B = 65536 would take hours in the interpreter)."""
    from moe_prune.kernels import routing

    calls = []

    def fake(x, phi, scale=None, gain=None, **kw):
        calls.append(x.shape)
        return soft_moe_routing_ref(x.float(), phi.float(), scale, gain, token_norm=kw["token_norm"],
                                    mask=kw["mask"], slots_per_expert=kw["slots_per_expert"])

    monkeypatch.setattr(routing, "soft_moe_routing", fake)
    return calls


def test_float64_routes_through_torch_even_when_forced():
    """The kernel takes fp32/fp16/bf16: a float64 layer falls back to torch (use_triton=True included)."""
    layer = SoftMoE(SoftMoEConfig(dim=24, num_experts=4, slots_per_expert=2, hidden=8)).eval().double().to(DEVICE)
    x = torch.randn(2, 9, 24, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        layer.use_triton = False
        ref = layer(x)
        layer.use_triton = True
        assert not layer.triton_for(x)
        out = layer(x)  # the launcher would raise ValueError (float64) if it were called
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert layer.triton_for(x.float())  # fp32 of the same shape does go to the kernel


def test_batch_beyond_the_grid_routes_through_torch(monkeypatch):
    """The batch is the kernel's grid axis 1 (at most 65535 on CUDA): a larger batch falls back to torch."""
    layer = SoftMoE(SoftMoEConfig(dim=4, num_experts=2, slots_per_expert=1, hidden=4)).eval().to(DEVICE)
    layer.use_triton = True
    calls = _counting_kernel(monkeypatch)
    with torch.no_grad():
        weights(layer, torch.randn(65535, 1, 4, device=DEVICE))
        assert len(calls) == 1  # the largest batch the grid takes still uses the kernel
        x = torch.randn(65536, 1, 4, device=DEVICE)
        dispatch, combine = weights(layer, x)
        assert len(calls) == 1  # one more input: torch
        layer.use_triton = False
        ref = weights(layer, x)
    torch.testing.assert_close(dispatch, ref[0], atol=0, rtol=0)
    torch.testing.assert_close(combine, ref[1], atol=0, rtol=0)


@pytest.mark.gpu
def test_layer_on_cuda_uses_the_kernel_by_default(monkeypatch):
    """On a GPU, a CUDA layer in eval routes through the compiled kernel (use_triton unset) at the ViT shape, and
    gives the torch path's outputs."""
    layer = SoftMoE(SoftMoEConfig(dim=64, num_experts=32, slots_per_expert=4, hidden=32)).eval().cuda()
    x = torch.randn(4, 197, 64, device="cuda")
    with torch.no_grad():
        assert layer.use_triton is None and layer.triton_for(x)
        out = layer(x)
        layer.use_triton = False
        ref = layer(x)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])


# -- the references ----------------------------------------------------------------------------------------------


def test_reference_is_routing_ref_exactly():
    x, phi, kw = make_inputs(2, 33, 40, 7, 3, torch.float32, gain=True, mask=True)
    d, c, s = soft_moe_routing_ref(x, phi, kw["scale"], kw["gain"], mask=kw["mask"])
    rd, rc = routing_ref(x, phi, kw["scale"], kw["gain"], mask=kw["mask"])
    assert torch.equal(d, rd) and torch.equal(c, rc)
    assert torch.equal(s, rc.reshape(2, 33, 7, 3).sum(dim=(1, 3)))


def test_expert_scores_ref_matches_full_reference():
    x, phi, kw = make_inputs(2, 33, 40, 7, 3, torch.float32, gain=True, mask=True)
    scores = expert_scores_ref(x, phi, kw["scale"], kw["gain"], mask=kw["mask"])
    torch.testing.assert_close(scores, soft_moe_routing_ref(x, phi, kw["scale"], kw["gain"], mask=kw["mask"])[2])


# -- launcher checks ---------------------------------------------------------------------------------------------


def test_config_one_pass_at_vit_shapes():
    for dtype in ("fp32", "fp16", "bf16"):
        for capability in ((7, 5), (8, 6), (9, 0)):
            cfg = routing_config(dtype, capability, 197, 128)
            assert cfg.one_pass_rows and cfg.one_pass_cols
            assert cfg.row_n >= 128 and cfg.col_m >= 197
    assert not routing_config("fp16", (9, 0), 197, 1024).one_pass_rows
    assert not routing_config("fp16", (9, 0), 1024, 128).one_pass_cols


def test_bad_arguments_raise():
    x, phi, kw = make_inputs(1, 5, 8, 4, 1, torch.float32)
    with pytest.raises(NotImplementedError):
        soft_moe_routing(x, phi, kw["scale"], token_norm="layer")
    with pytest.raises(ValueError, match="phi"):
        soft_moe_routing(x, phi[:4], kw["scale"])
    with pytest.raises(ValueError, match="mask"):
        soft_moe_routing(x, phi, kw["scale"], mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="float32"):
        soft_moe_routing(x.double(), phi.double())
    one_pass = routing_config("fp32", None, 5, 4)
    with pytest.raises(ValueError, match="one-pass"):
        soft_moe_routing(x, phi, config=dataclasses.replace(one_pass, row_n=2))


# -- ahead-of-time compile for real GPUs (no GPU needed) ---------------------------------------------------------

# Shared memory one block may use, per target (bytes).
SMEM_LIMIT = {"sm_75": 64 * 1024, "sm_86": 99 * 1024, "sm_90": 227 * 1024}


def test_kernel_compiles_for_gpus_without_spills(tmp_path):
    """benchmarks/kernel_compile.py, in a subprocess without TRITON_INTERPRET: the kernel compiles for sm_75,
    sm_86 and sm_90 with no register spills and within each target's shared memory. Covered here: fp32 and fp16
    (bf16 compiles like fp16), the one-pass variant and the one with both softmaxes in two passes, with every
    feature on and with none; the script's default run compiles all 72 (benchmarks/results/kernel_compile.json)."""
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_compile.py"), "--dtypes", "fp32", "fp16",
           "--variants", "vit", "wide+long", "--features", "full", "bare", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    kernels = json.loads(out.read_text())["kernels"]
    expected = {(a, d, v, f) for a in SMEM_LIMIT for d in ("fp32", "fp16") for v in ("vit", "wide+long")
                for f in ("full", "bare")}
    assert {(k["arch"], k["dtype"], k["variant"], k["features"]) for k in kernels} == expected
    for k in kernels:
        where = f"{k['arch']} {k['dtype']} {k['variant']} {k['features']}"
        assert k["stack"] == 0 and k["local"] == 0, f"{where}: spills (STACK {k['stack']}, LOCAL {k['local']})"
        assert k["shared_total"] <= SMEM_LIMIT[k["arch"]], f"{where}: {k['shared_total']} bytes of shared memory"
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: DTYPE_NAMES[d])
def test_16_bit_tokens_times_a_large_gain_are_normalized_before_the_cast(dtype):
    """A converted soft-moe-pytorch layer has a token gain of about sqrt(D) times its RMSNorm gamma: raw tokens of
    |x| ~ 3000 times a gain of 28 pass fp16's 65504 if the gain multiplies before the 16-bit cast. The kernel
    normalizes first, as torch does: the routing equals torch's on the same tokens."""
    g = torch.Generator().manual_seed(3)
    D = 64  # |x| stays representable in fp16 itself (3000 * sqrt(64) = 24000)
    x = (torch.randn(2, 9, D, generator=g) * 3000).to(dtype).to(DEVICE)
    gain = torch.full((D,), 28.0, dtype=dtype, device=DEVICE)
    phi = (torch.randn(D, 6, 1, generator=g) / 8).to(dtype).to(DEVICE)
    dispatch, combine, scores = soft_moe_routing(x, phi, None, gain, token_norm="l2")
    ref = soft_moe_routing_ref(x.float(), phi.float(), None, gain.float(), token_norm="l2")
    assert torch.isfinite(dispatch).all() and torch.isfinite(combine).all() and torch.isfinite(scores).all()
    torch.testing.assert_close(combine.float(), ref[1], **TOL[dtype])
    torch.testing.assert_close(dispatch.float(), ref[0], **TOL[dtype])


def test_scores_sum_the_combine_weights_as_stored():
    """fp16 scores are the sums of the fp16 combine weights the kernel wrote (rounded, then summed in fp32), as
    torch sums its own fp16 combine tensor: the two paths rank experts from the same numbers."""
    x, phi, kw = make_inputs(3, 33, 40, 16, 1, torch.float16, scale=True, gain=True)
    _, combine, scores = soft_moe_routing(x, phi, **kw)
    torch.testing.assert_close(scores, combine.float().sum(dim=1), atol=1e-5, rtol=1e-6)
