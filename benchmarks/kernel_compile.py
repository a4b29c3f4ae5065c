"""Ahead-of-time compile of the Triton kernels for the GPUs we ship to; no GPU needed.

Question: does every configuration the launchers can pick compile for sm_75 (RTX 2080 Ti), sm_86 (A6000) and
sm_90 (H100) without register spills and within each GPU's shared memory per block? Two kernels:
- routing (`moe_prune.kernels.routing.routing_config` of each dtype and target): specialized as a launch with
  contiguous tensors would specialize it (the one-pass variant from the ViT-B/16 shape M=197, D=768, E=128, S=1;
  the two-pass variants from M or N = 1024);
- grouped experts (`moe_prune.kernels.grouped_experts.grouped_experts_config` of each dtype, target and expert
  kind): specialized from ViT-B/16's experts (D=768, H=3072, D_out=768: the widest output tile) and from a narrow
  one (D=196, H=49, D_out=32: the MNIST model's D and H with a 32-wide output tile).
Each is compiled with triton.compile for the target, and its cubin's resource usage read with the bundled
`cuobjdump --dump-resource-usage` (REG, STACK, LOCAL, SHARED).

    python benchmarks/kernel_compile.py                   # tables + benchmarks/results/kernel_compile.json
    python benchmarks/kernel_compile.py --kernels routing --features full --archs 90 --dtypes fp16
    python benchmarks/kernel_compile.py --kernels grouped --kinds geglu --grouped-shapes vit-b

Must run without TRITON_INTERPRET (the interpreter replaces @triton.jit functions); it unsets it for itself.
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compile the real kernel, not its interpreter

import argparse
import concurrent.futures
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import torch

from moe_prune.measurement.timing import environment as bench_environment
from moe_prune.measurement.reports import write_json
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from moe_prune.kernels import grouped_experts as grouped
from moe_prune.kernels.routing import _soft_moe_routing_kernel, kernel_args
from moe_prune.kernels.launch import routing_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
# Compute capability -> (a GPU of that family, the most shared memory one block may use, bytes).
TARGETS = {
    75: ("RTX 2080 Ti", 64 * 1024),
    86: ("A6000", 99 * 1024),
    90: ("H100", 227 * 1024),
}
# The launcher compiles one variant per (ONE_PASS_ROWS, ONE_PASS_COLS), set by whether N fits a row tile and M a
# column tile; each is specialized from a shape that selects it (D=768, S=1). "vit" is ViT-B/16 Soft MoE.
VARIANTS = {
    "vit": dict(M=197, N=128),  # one pass for both softmaxes
    "wide": dict(M=197, N=1024),  # combine in two passes (N > ROW_N)
    "long": dict(M=1024, N=128),  # dispatch in two passes (M > COL_M)
    "wide+long": dict(M=1024, N=1024),
}
REF_D, REF_S = 768, 1
DTYPES = ("fp32", "fp16", "bf16")
FEATURES = {
    "full": dict(token_norm="l2", scale=True, gain=True, mask=True),  # every branch of the kernel on
    "bare": dict(token_norm="none", scale=False, gain=False, mask=False),  # every branch off
}
_TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.bool: "i1",
                    torch.int32: "i32"}
# Grouped experts: expert shapes (D, H, D_out) that select the widest and a narrow output tile; R rows over E
# experts (R=4096: batch 256 with K=16 of E=128 experts kept, S=1).
GROUPED_SHAPES = {
    "vit-b": dict(D=768, H=3072, D_out=768),  # ViT-B/16 Soft MoE experts: BLOCK_N at its cap
    "narrow": dict(D=196, H=49, D_out=32),  # MNIST's D and H with a 32-wide output: a small BLOCK_N
}
GROUPED_R, GROUPED_E = 4096, 128
KINDS = ("gelu_mlp", "relu_mlp", "geglu")


def _signature(args: tuple, constexprs: dict, fn=_soft_moe_routing_kernel) -> tuple[dict, dict, dict]:
    """Mirror Triton's launch specialization of kernel `fn` for `args`: ints equal to 1 become constexprs,
    pointers and ints divisible by 16 get tt.divisibility=16, floats are fp32. Returns (signature, constexprs,
    attrs)."""
    names = fn.arg_names
    signature, consts, attrs = {}, {}, {}
    for i, (name, value) in enumerate(zip(names, args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TORCH_TO_TRITON[value.dtype]
            divisible = value.data_ptr() % 16 == 0
        elif isinstance(value, bool):
            raise TypeError(f"{name}: bool arguments are not used by this kernel")
        elif isinstance(value, int):
            if value == 1:
                signature[name], consts[name] = "constexpr", 1
                continue
            signature[name] = "i32"
            divisible = value % 16 == 0
        elif isinstance(value, float):
            signature[name], divisible = "fp32", False
        else:
            raise TypeError(f"{name}: unexpected argument type {type(value)}")
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in names[len(args):]:
        signature[name] = "constexpr"
        consts[name] = constexprs[name]
    return signature, consts, attrs


def _aligned(*shape, dtype):
    return torch.empty(*shape, dtype=dtype)  # CPU allocations are 64-byte aligned, like CUDA's 256-byte ones


def compile_one(dtype: str, variant: str, features: str, arch: int, workdir: pathlib.Path) -> dict:
    """Compile what the launcher would launch for `dtype` inputs of shape `variant` on compute capability `arch`;
    return its resource usage."""
    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    M, N, D, S, B = VARIANTS[variant]["M"], VARIANTS[variant]["N"], REF_D, REF_S, 2
    cfg = routing_config(dtype, divmod(arch, 10), M, N)
    E = N // S
    f = FEATURES[features]
    x = _aligned(B, M, D, dtype=tdtype)
    phi = _aligned(D, N, dtype=tdtype)
    scale = _aligned(1, dtype=tdtype) if f["scale"] else None
    gain = _aligned(D, dtype=tdtype) if f["gain"] else None
    mask = _aligned(B, M, dtype=torch.bool) if f["mask"] else None
    dispatch, combine = _aligned(B, M, N, dtype=tdtype), _aligned(B, M, N, dtype=tdtype)
    scores = _aligned(B, E, dtype=torch.float32)
    _, args, constexprs = kernel_args(x, phi, scale, gain, mask, dispatch, combine, scores, S, 1e-6, f["token_norm"],
                                      cfg, {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[dtype])
    signature, consts, attrs = _signature(args, constexprs)
    src = triton.compiler.ASTSource(fn=_soft_moe_routing_kernel, signature=signature, constexprs=consts, attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=cfg.launch_options())
    seconds = time.perf_counter() - t0
    row = dict(
        dtype=dtype, variant=variant, one_pass_rows=constexprs["ONE_PASS_ROWS"],
        one_pass_cols=constexprs["ONE_PASS_COLS"], shape=dict(M=M, D=D, N=N, S=S), features=features,
        arch=f"sm_{arch}", gpu=TARGETS[arch][0],
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, tensor_cores_config=cfg.tensor_cores,
        tiles=dict(row=[cfg.row_m, cfg.row_n], col=[cfg.col_m, cfg.col_n], block_d=cfg.block_d),
    )
    row.update(_usage(compiled, workdir / f"routing_{dtype}_{variant}_{features}_sm{arch}.cubin", arch, cfg.num_warps))
    row["compile_s"] = round(seconds, 2)
    return row


def compile_grouped(dtype: str, kind: str, shape: str, arch: int, workdir: pathlib.Path) -> dict:
    """Compile what `grouped_experts` would launch for `dtype` experts of `kind` and shape `shape` on compute
    capability `arch`; return its resource usage."""
    tdtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    D, H, D_out = (GROUPED_SHAPES[shape][k] for k in ("D", "H", "D_out"))
    R, E = GROUPED_R, GROUPED_E
    cfg = grouped.grouped_experts_config(dtype, divmod(arch, 10), D_out)
    H1 = 2 * H if kind == "geglu" else H
    biases = kind != "relu_mlp"
    x, y = _aligned(R, D, dtype=tdtype), _aligned(R, D_out, dtype=tdtype)
    w1, w2 = _aligned(E, D, H1, dtype=tdtype), _aligned(E, H, D_out, dtype=tdtype)
    b1 = _aligned(E, H1, dtype=tdtype) if biases else None
    b2 = _aligned(E, D_out, dtype=tdtype) if biases else None
    T = min(R, R // cfg.block_m + min(E, R))
    rows, tile_experts = _aligned(T * cfg.block_m, dtype=torch.int32), _aligned(T, dtype=torch.int32)
    _, args, constexprs = grouped.kernel_args(x, w1, b1, w2, b2, y, rows, tile_experts, kind, cfg,
                                              grouped.TL_DTYPES[dtype])
    signature, consts, attrs = _signature(args, constexprs, grouped._grouped_experts_kernel)
    src = triton.compiler.ASTSource(fn=grouped._grouped_experts_kernel, signature=signature, constexprs=consts,
                                    attrs=attrs)
    t0 = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=cfg.launch_options())
    seconds = time.perf_counter() - t0
    row = dict(dtype=dtype, kind=kind, shape_name=shape, shape=dict(R=R, E=E, D=D, H=H, D_out=D_out),
               arch=f"sm_{arch}", gpu=TARGETS[arch][0], num_warps=cfg.num_warps, num_stages=cfg.num_stages,
               maxnreg=cfg.maxnreg, tensor_cores_config=cfg.tensor_cores,
               tiles=dict(block_m=cfg.block_m, block_n=cfg.block_n, block_h=cfg.block_h, block_d=cfg.block_d))
    row.update(_usage(compiled, workdir / f"grouped_{dtype}_{kind}_{shape}_sm{arch}.cubin", arch, cfg.num_warps))
    row["compile_s"] = round(seconds, 2)
    return row


def _usage(compiled, cubin: pathlib.Path, arch: int, num_warps: int) -> dict:
    """Registers, spills, shared memory and the dot instruction of one compiled kernel."""
    cubin.write_bytes(compiled.asm["cubin"])
    usage = cuobjdump_usage(cubin)
    ptx = compiled.asm["ptx"]
    dynamic_smem = int(compiled.metadata.shared)
    limit = TARGETS[arch][1]
    return dict(
        regs=usage["REG"], stack=usage["STACK"], local=usage["LOCAL"], static_shared=usage["SHARED"],
        dynamic_shared=dynamic_smem, shared_total=dynamic_smem + usage["SHARED"], shared_limit=limit,
        spills=usage["STACK"] > 0 or usage["LOCAL"] > 0,
        fits=usage["STACK"] == 0 and usage["LOCAL"] == 0 and dynamic_smem + usage["SHARED"] <= limit
        and usage["REG"] * num_warps * 32 <= 65536,
        dot=("wgmma" if re.search(r"\bwgmma\.", ptx) else "mma" if re.search(r"\bmma\.", ptx) else "fma"),
    )


def cuobjdump_usage(cubin: pathlib.Path) -> dict:
    """REG, STACK, SHARED, LOCAL of the one kernel in `cubin`, from the cuobjdump bundled with triton."""
    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    line = next(ln for ln in text.splitlines() if "REG:" in ln)
    return {key: int(val) for key, val in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}


def environment() -> dict:
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    ptxas_version = subprocess.run([str(ptxas), "--version"], capture_output=True, text=True).stdout.strip()
    env = bench_environment()
    env["device"] += "; cubins compiled ahead of time"
    env["ptxas"] = ptxas_version.splitlines()[-1] if ptxas_version else None
    return env




def _compile_all(fn, jobs: list[tuple], n_jobs: int, workdir: pathlib.Path) -> list[dict]:
    if n_jobs > 1 and len(jobs) > 1:
        # Separate processes: compiling is CPU-bound Python + ptxas, and the order of rows stays fixed.
        with concurrent.futures.ProcessPoolExecutor(n_jobs) as pool:
            return list(pool.map(fn, *zip(*jobs), [workdir] * len(jobs)))
    return [fn(*job, workdir) for job in jobs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernels", nargs="+", default=["routing", "grouped"], choices=["routing", "grouped"],
                        help="kernels to compile (default: both)")
    parser.add_argument("--archs", type=int, nargs="+", default=sorted(TARGETS), choices=sorted(TARGETS),
                        help="compute capabilities to compile for (default: all)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES, help="input dtypes")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="routing: shape variants (one-pass / two-pass code paths)")
    parser.add_argument("--features", nargs="+", default=list(FEATURES), choices=sorted(FEATURES),
                        help="routing: feature sets: full (l2 norm, scale, gain, mask) and/or bare (none of them)")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="grouped: expert kinds")
    parser.add_argument("--grouped-shapes", nargs="+", default=list(GROUPED_SHAPES), choices=list(GROUPED_SHAPES),
                        help="grouped: expert shapes (widest and a narrow output tile)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "kernel_compile.json", help="JSON to write")
    args = parser.parse_args(argv)

    routing_jobs = [(dtype, variant, features, arch) for arch in args.archs for dtype in args.dtypes
                    for variant in args.variants for features in args.features] if "routing" in args.kernels else []
    grouped_jobs = [(dtype, kind, shape, arch) for arch in args.archs for dtype in args.dtypes
                    for kind in args.kinds for shape in args.grouped_shapes] if "grouped" in args.kernels else []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rows = _compile_all(compile_one, routing_jobs, args.jobs, pathlib.Path(tmp))
        grouped_rows = _compile_all(compile_grouped, grouped_jobs, args.jobs, pathlib.Path(tmp))
    if rows:
        header = f"{'arch':6} {'gpu':12} {'dtype':5} {'variant':10} {'feat':5} {'warps':>5} {'BLOCK_D':>7} " \
                 f"{'regs':>5} {'stack':>5} {'local':>5} {'smem KiB':>9} {'limit':>6} {'dot':>5} {'ok':>3}"
        print("routing (_soft_moe_routing_kernel)")
        print(header)
        print("-" * len(header))
        for r in rows:
            print(f"{r['arch']:6} {r['gpu']:12} {r['dtype']:5} {r['variant']:10} {r['features']:5} "
                  f"{r['num_warps']:>5} {r['tiles']['block_d']:>7} "
                  f"{r['regs']:>5} {r['stack']:>5} {r['local']:>5} {r['shared_total'] / 1024:>9.1f} "
                  f"{r['shared_limit'] // 1024:>6} {r['dot']:>5} "
                  f"{'yes' if r['fits'] else 'NO':>3}")
    if grouped_rows:
        header = f"{'arch':6} {'gpu':12} {'dtype':5} {'kind':9} {'shape':7} {'warps':>5} {'M/N/H/D tiles':>15} " \
                 f"{'regs':>5} {'stack':>5} {'local':>5} {'smem KiB':>9} {'limit':>6} {'dot':>5} {'ok':>3}"
        print("\ngrouped experts (_grouped_experts_kernel)")
        print(header)
        print("-" * len(header))
        for r in grouped_rows:
            t = r["tiles"]
            tiles = f"{t['block_m']}/{t['block_n']}/{t['block_h']}/{t['block_d']}"
            print(f"{r['arch']:6} {r['gpu']:12} {r['dtype']:5} {r['kind']:9} {r['shape_name']:7} "
                  f"{r['num_warps']:>5} {tiles:>15} "
                  f"{r['regs']:>5} {r['stack']:>5} {r['local']:>5} {r['shared_total'] / 1024:>9.1f} "
                  f"{r['shared_limit'] // 1024:>6} {r['dot']:>5} "
                  f"{'yes' if r['fits'] else 'NO':>3}")
    everything = rows + grouped_rows
    bad = [r for r in everything if not r["fits"]]
    print(f"\n{len(everything) - len(bad)}/{len(everything)} configurations compile without spills and within "
          f"shared memory ({time.perf_counter() - t0:.0f} s)")
    write_json(args.out, dict(environment(), variants=VARIANTS, features=FEATURES, kernels=rows,
                              grouped_shapes=GROUPED_SHAPES, grouped_kernels=grouped_rows))
    print(f"wrote {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
