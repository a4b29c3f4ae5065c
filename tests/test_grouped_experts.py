"""The grouped-experts kernel against its torch reference and a float64 oracle (under TRITON_INTERPRET=1 without a
GPU; on CUDA when one is present).

Every launch writes into an output poisoned with NaN, so a row or column the kernel skips fails the test. Sizes are
not multiples of the tiles (D=40, H=52, D_out=24 against 16..256-wide tiles); expert ids are unsorted, some experts
get no rows, and the small-tile configuration (16-wide tiles) reaches several row tiles per expert, several output
tiles per row tile and several trips of both loops. Tolerances: a dropped bias, a swapped GEGLU half or a wrong
weight axis moves outputs by O(0.1..1) (biases are drawn at that scale), two orders above each dtype's tolerance.
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

from moe_prune.kernels.grouped_experts import (
    expert_layout, grouped_experts, grouped_experts_ref, grouped_experts_supported,
)
from moe_prune.kernels.launch import grouped_experts_config
from moe_prune.core.layers import StackedExperts  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
KINDS = ("gelu_mlp", "relu_mlp", "geglu")
# Kernel against the reference in fp32 on the same (rounded) inputs. fp32: both accumulate in fp32 (~1e-6 apart
# at these sizes). 16-bit: the hidden activations are rounded to the input type for the second tl.dot and the
# output once more; under the interpreter bf16 dots run in fp32, so bf16 is checked for its loads and stores.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=3e-3, rtol=3e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
SMALL_TILES = dict(block_m=16, block_n=16, block_h=16, block_d=16)


def make_bank(kind, E, D, H, D_out, dtype):
    """Weights of E experts, scaled so that hidden and output values are O(1); biases O(0.3) so a missing one
    shows."""
    H1 = 2 * H if kind == "geglu" else H
    w1 = (torch.randn(E, D, H1) / D**0.5).to(DEVICE, dtype)  # [E, D, H1]
    w2 = (torch.randn(E, H, D_out) / H**0.5).to(DEVICE, dtype)  # [E, H, D_out]
    biases = kind != "relu_mlp"
    b1 = (0.3 * torch.randn(E, H1)).to(DEVICE, dtype) if biases else None  # [E, H1]
    b2 = (0.3 * torch.randn(E, D_out)).to(DEVICE, dtype) if biases else None  # [E, D_out]
    return w1, b1, w2, b2


def run_kernel(x, ids, bank, kind, config=None):
    """The kernel writing into a NaN-poisoned output; fails if any element stays unwritten."""
    w1, b1, w2, b2 = bank
    out = torch.full((x.shape[0], w2.shape[2]), float("nan"), dtype=x.dtype, device=x.device)
    y = grouped_experts(x, ids, w1, b1, w2, b2, kind, out=out, config=config)
    assert y is out
    assert torch.isfinite(y).all(), f"{int((~torch.isfinite(y)).sum())} elements not written"
    return y


def reference_fp32(x, ids, bank, kind):
    return grouped_experts_ref(x.float(), ids, *(t.float() if t is not None else None for t in bank), kind)


def oracle_f64(x, ids, bank, kind):
    """Independent of the reference: every row with its own expert's weights gathered, in float64, with GELU and
    the GEGLU split written out."""
    w1, b1, w2, b2 = (t.double()[ids] if t is not None else None for t in bank)  # per-row weights
    h = torch.einsum("rd,rdh->rh", x.double(), w1)  # [R, H1]
    if b1 is not None:
        h = h + b1
    gelu = lambda v: 0.5 * v * (1 + torch.erf(v / 2**0.5))  # noqa: E731
    if kind == "gelu_mlp":
        h = gelu(h)
    elif kind == "relu_mlp":
        h = h.clamp_min(0)
    else:
        H = h.shape[1] // 2
        h = h[:, :H] * gelu(h[:, H:])  # value first, then gate
    y = torch.einsum("rh,rhn->rn", h, w2)  # [R, D_out]
    return y + b2 if b2 is not None else y


def check(R, E, D, H, D_out, kind, dtype, ids=None, config=None):
    bank = make_bank(kind, E, D, H, D_out, dtype)
    x = torch.randn(R, D).to(DEVICE, dtype)  # [R, D]
    if ids is None:
        ids = torch.randint(0, E, (R,))
    ids = ids.to(DEVICE)
    y = run_kernel(x, ids, bank, kind, config)
    ref = reference_fp32(x, ids, bank, kind)
    torch.testing.assert_close(y.float(), ref, **TOL[dtype])
    torch.testing.assert_close(y.double(), oracle_f64(x, ids, bank, kind), **TOL[dtype])
    return x, ids, bank, y


# -- the kernel against the reference ----------------------------------------------------------------------------


def some_experts_unused(R, E):
    """Unsorted ids over E experts with experts 1 and E-1 getting no rows (and 0 several)."""
    used = torch.tensor([e for e in range(E) if e not in (1, E - 1)])
    return used[torch.randint(0, len(used), (R,))]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_NAMES[d])
def test_kernel_matches_reference(kind, dtype):
    """The shipped configuration: D=40, H=52, D_out=24 fit one tile each; 37 unsorted rows over 6 experts, two
    of them without rows."""
    ids = some_experts_unused(37, 6)
    assert not torch.equal(ids, ids.sort().values)
    check(37, 6, 40, 52, 24, kind, dtype, ids)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=lambda d: DTYPE_NAMES[d])
def test_small_tiles_every_loop(kind, dtype):
    """16-wide tiles: 3 trips over D=40, 4 over H=52, 2 output tiles for D_out=24 and up to 3 row tiles per
    expert, each with a partial last block."""
    cfg = dataclasses.replace(grouped_experts_config(DTYPE_NAMES[dtype], None, 24), **SMALL_TILES)
    ids = some_experts_unused(70, 4)  # 2 used experts: ~35 rows each
    check(70, 4, 40, 52, 24, kind, dtype, ids, config=cfg)


def test_all_rows_on_one_expert():
    cfg = dataclasses.replace(grouped_experts_config("fp32", None, 24), **SMALL_TILES)
    check(37, 5, 40, 52, 24, "gelu_mlp", torch.float32, torch.full((37,), 3), config=cfg)


@pytest.mark.parametrize("kind", KINDS)
def test_one_row(kind):
    check(1, 5, 40, 52, 24, kind, torch.float32, torch.tensor([4]))


def test_no_rows():
    w1, b1, w2, b2 = make_bank("gelu_mlp", 3, 40, 52, 24, torch.float32)
    y = grouped_experts(torch.empty(0, 40, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE),
                        w1, b1, w2, b2, "gelu_mlp")
    assert y.shape == (0, 24) and y.dtype == torch.float32
    assert grouped_experts_ref(torch.empty(0, 40, device=DEVICE), torch.empty(0, dtype=torch.long, device=DEVICE),
                               w1, b1, w2, b2, "gelu_mlp").shape == (0, 24)


def test_fma_config_for_fp16():
    """The configuration sm_75 gets for fp16 (FMA tiles, BLOCK_H=BLOCK_D=16) gives the same results."""
    cfg = grouped_experts_config("fp16", (7, 5), 24)
    assert not cfg.tensor_cores and cfg.block_d == 16
    check(37, 6, 40, 52, 24, "geglu", torch.float16, some_experts_unused(37, 6), config=cfg)


def test_strided_inputs_and_output():
    """x a transposed view, w1 and w2 non-contiguous, out a column slice of a wider buffer."""
    kind, R, E, D, H, D_out = "geglu", 21, 4, 40, 52, 24
    w1, b1, w2, b2 = make_bank(kind, E, D, H, D_out, torch.float32)
    w1 = w1.transpose(1, 2).contiguous().transpose(1, 2)  # [E, D, 2H], strides (2HD, 1, D)
    w2 = w2.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # [E, H, D_out], E not outermost
    x = torch.randn(D, R, device=DEVICE).t()  # [R, D], strides (1, R)
    ids = torch.randint(0, E, (R,), device=DEVICE)
    buf = torch.full((R, D_out + 7), float("nan"), device=DEVICE)
    out = buf[:, 3:3 + D_out]  # [R, D_out], row stride D_out + 7
    assert not (x.is_contiguous() or w1.is_contiguous() or w2.is_contiguous() or out.is_contiguous())
    grouped_experts(x, ids, w1, b1, w2, b2, kind, out=out)
    torch.testing.assert_close(out, reference_fp32(x, ids, (w1, b1, w2, b2), kind), **TOL[torch.float32])
    assert buf[:, :3].isnan().all() and buf[:, 3 + D_out:].isnan().all()  # nothing outside out written


def test_int32_ids_and_stacked_experts_math():
    """The layer's own StackedExperts (per-input subsets: each of K slot groups through its own expert) equals
    the kernel on the flattened rows."""
    torch.manual_seed(1)
    for kind in KINDS:
        experts = StackedExperts(kind, num=6, dim=40, hidden=52, out_dim=24).to(DEVICE)
        if experts.b1 is not None:
            torch.nn.init.normal_(experts.b1, std=0.3)
            torch.nn.init.normal_(experts.b2, std=0.3)
        slots = torch.randn(3, 5, 40, device=DEVICE)  # [K, N, D]: 3 slot groups of 5 rows
        idx = torch.tensor([4, 0, 4], device=DEVICE)  # expert of each group (repeated: two groups on expert 4)
        with torch.no_grad():
            ref = experts(slots, idx)  # [K, N, D_out]
            ids = idx.repeat_interleave(5).to(torch.int32)  # [K*N]
            y = grouped_experts(slots.reshape(15, 40), ids, experts.w1, experts.b1, experts.w2, experts.b2, kind)
        torch.testing.assert_close(y.reshape(3, 5, 24), ref, **TOL[torch.float32])


# -- layout, configuration, arguments ----------------------------------------------------------------------------


@pytest.mark.parametrize("R,E,block_m", [(1, 4, 16), (37, 6, 16), (64, 2, 32), (5, 50, 2), (100, 3, 1)])
def test_layout(R, E, block_m):
    """Every row once, each tile's rows on its expert, padding only at each run's end, a stable order, and the
    upper bound T holding exactly the tiles needed plus spares."""
    ids = torch.randint(0, E, (R,))
    rows, tiles = expert_layout(ids, E, block_m)
    T = tiles.numel()
    assert rows.dtype == tiles.dtype == torch.int32 and rows.numel() == T * block_m
    real = rows[rows >= 0].long()
    assert torch.equal(real.sort().values, torch.arange(R))
    needed = int(((torch.bincount(ids, minlength=E) + block_m - 1) // block_m).sum())
    assert T >= needed and (tiles[:needed] >= 0).all() and (tiles[needed:] == -1).all()
    assert (rows.view(T, block_m)[needed:] == -1).all()
    for t in range(needed):
        tile_rows = rows.view(T, block_m)[t]
        ok = tile_rows >= 0
        assert ok[0] and (ids[tile_rows[ok].long()] == tiles[t]).all()
        assert torch.equal(ok, ok.sort(descending=True).values)  # padding after the rows
    assert torch.equal(real, torch.sort(ids, stable=True).indices)  # stably sorted by expert


def test_config_tiles():
    for dtype in ("fp32", "fp16", "bf16"):
        for capability in ((7, 5), (8, 6), (9, 0), None):
            cfg = grouped_experts_config(dtype, capability, 384)
            tc = dtype != "fp32" and (capability is None or capability[0] >= 8)
            assert cfg.tensor_cores == tc
            assert cfg.block_n == (256 if tc else 128)
            assert cfg.block_d >= (8 if dtype == "fp32" else 16) and cfg.block_h >= 16
    assert grouped_experts_config("fp16", (9, 0), 24).block_n == 32  # one tile covers a small D_out
    assert grouped_experts_config("fp16", (9, 0), 3).block_n == 16  # tl.dot's smallest N on a GPU
    with pytest.raises(ValueError, match="dtype"):
        grouped_experts_config("fp64", None, 8)


def test_supported_predicate():
    x, w1 = torch.randn(4, 40, device=DEVICE), torch.randn(3, 40, 52, device=DEVICE)
    assert grouped_experts_supported(x, w1, "gelu_mlp")
    assert grouped_experts_supported(x.half(), w1.half(), "geglu")
    assert not grouped_experts_supported(x.double(), w1.double(), "gelu_mlp")  # float64
    assert not grouped_experts_supported(x, w1.half(), "gelu_mlp")  # mixed dtypes
    assert not grouped_experts_supported(x, w1, "swiglu")  # unknown kind
    assert not grouped_experts_supported(x[:, :8], w1, "gelu_mlp")  # D mismatch
    if DEVICE == "cpu":
        # Meta tensors (no memory) pass as CPU ones do under the interpreter: a w1 whose offsets need 64 bits.
        xm = torch.empty(4, 40, device="meta")
        assert grouped_experts_supported(xm, torch.empty(1, 40, 52, device="meta"), "gelu_mlp")
        huge = torch.empty_strided((1, 40, 52), (1, 1 << 26, 1), device="meta")  # offset 39 * 2**26 in expert 0
        assert not grouped_experts_supported(xm, huge, "gelu_mlp")
        env = os.environ.pop("TRITON_INTERPRET")
        try:
            assert not grouped_experts_supported(x, w1, "gelu_mlp")  # a CPU tensor without the interpreter
        finally:
            os.environ["TRITON_INTERPRET"] = env


def test_bad_arguments_raise():
    w1, b1, w2, b2 = make_bank("gelu_mlp", 3, 8, 6, 5, torch.float32)
    x, ids = torch.randn(4, 8, device=DEVICE), torch.tensor([0, 2, 1, 0], device=DEVICE)
    with pytest.raises(ValueError, match="kind"):
        grouped_experts(x, ids, w1, b1, w2, b2, "swiglu")
    with pytest.raises(ValueError, match="2H"):
        grouped_experts(x, ids, w1, b1, w2, b2, "geglu")  # w1 has H columns, GEGLU needs 2H
    with pytest.raises(ValueError, match="b2"):
        grouped_experts(x, ids, w1, b1, w2, b1, "gelu_mlp")
    with pytest.raises(ValueError, match="expert_ids"):
        grouped_experts(x, ids[:3], w1, b1, w2, b2, "gelu_mlp")
    with pytest.raises(ValueError, match="float16"):
        grouped_experts(x, ids, w1.half(), b1, w2, b2, "gelu_mlp")
    with pytest.raises(ValueError, match="out"):
        grouped_experts(x, ids, w1, b1, w2, b2, "gelu_mlp", out=torch.empty(4, 6, device=DEVICE))
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"\[0, 3\)"):
            grouped_experts(x, torch.tensor([0, 3, 1, 0]), w1, b1, w2, b2, "gelu_mlp")
        huge_w2 = torch.empty_strided((3, 6, 5), (1, 1 << 29, 1), device="meta")  # offsets past 2**31
        with pytest.raises(ValueError, match="2\\*\\*31"):
            grouped_experts(x.to("meta"), ids.to("meta"), w1.to("meta"), None, huge_w2, None, "relu_mlp")


# -- on a GPU ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: DTYPE_NAMES[d])
def test_vit_sized_experts_on_gpu(kind, dtype):
    """ViT-S/16-sized experts (D=384, H=1536) with the shipped tiles on the GPU present (tensor cores for 16-bit
    on sm_80+): K=16 of 128 experts for 32 inputs, ~4 rows per expert; 16-bit tolerances widened for the
    H=1536-long sums of rounded hidden activations."""
    E, D, H = 128, 384, 1536
    ids = torch.stack([torch.randperm(E)[:16] for _ in range(32)]).flatten()  # [B*K]
    bank = make_bank(kind, E, D, H, D, dtype)
    x = torch.randn(len(ids), D).to(DEVICE, dtype)
    y = run_kernel(x, ids.to(DEVICE), bank, kind)
    tol = {torch.float32: TOL[torch.float32], torch.float16: dict(atol=1e-2, rtol=1e-2),
           torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}[dtype]
    torch.testing.assert_close(y.float(), reference_fp32(x, ids.to(DEVICE), bank, kind), **tol)


# -- ahead-of-time compile for real GPUs (no GPU needed) ---------------------------------------------------------

SMEM_LIMIT = {"sm_75": 64 * 1024, "sm_86": 99 * 1024, "sm_90": 227 * 1024}


def test_kernel_compiles_for_gpus_without_spills(tmp_path):
    """benchmarks/kernel_compile.py --kernels grouped, in a subprocess without TRITON_INTERPRET: every kind in
    fp32 and fp16 (bf16 compiles like fp16) at the widest output tile compiles for sm_75, sm_86 and sm_90 with no
    register spills and within shared memory; the script's default run compiles all 54
    (benchmarks/results/kernel_compile.json, "grouped_kernels")."""
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "kernel_compile.py"), "--kernels", "grouped", "--dtypes",
           "fp32", "fp16", "--grouped-shapes", "vit-b", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["kernels"] == []
    kernels = result["grouped_kernels"]
    expected = {(a, d, k) for a in SMEM_LIMIT for d in ("fp32", "fp16") for k in KINDS}
    assert {(k["arch"], k["dtype"], k["kind"]) for k in kernels} == expected
    for k in kernels:
        where = f"{k['arch']} {k['dtype']} {k['kind']} {k['shape_name']}"
        assert k["stack"] == 0 and k["local"] == 0, f"{where}: spills (STACK {k['stack']}, LOCAL {k['local']})"
        assert k["shared_total"] <= SMEM_LIMIT[k["arch"]], f"{where}: {k['shared_total']} bytes of shared memory"
        assert k["dot"] == ("fma" if k["dtype"] == "fp32" or k["arch"] == "sm_75" else "mma"), where
    assert proc.returncode == 0, proc.stdout[-3000:]
