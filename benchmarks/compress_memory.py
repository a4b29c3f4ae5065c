"""Peak memory of writing a compressed checkpoint: `compress_file` against load + `compress_model` + save.

Question: how much memory does compressing a multi-GB checkpoint take? `compress_file` reads only the kept
experts' rows from the file (safetensors slices); the naive path (`moe_prune.load`, `compress_model`, `save`)
holds the whole model. Both write the same tensors.

The checkpoint is a bare Soft MoE layer (default D=1024, E=128, S=1, H=2048, GELU MLP experts: 2.15 GB of
float32), written tensor by tensor and expert by expert, so this script never holds it in memory. Each path runs
in a fresh child process; its peak resident set (the child's own /proc VmHWM; ru_maxrss from wait4 is kept
beside it in the JSON) is reported beside a baseline child that only imports moe_prune and reads the header. The kept
experts (1/8, drawn with a fixed seed) are given, so no calibration runs. The multi-GB files are deleted at the end.

    nice -n 10 .venv/bin/python benchmarks/compress_memory.py        # table + benchmarks/results/compress_memory.{json,md}
    .venv/bin/python benchmarks/compress_memory.py --dim 256 --experts 64 --hidden 512 --out /tmp/small.json  # quick
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MiB = 2**20


# -- the checkpoint, written without holding it ----------------------------------------------------------------


def write_layer_checkpoint(path: pathlib.Path, dim: int, experts: int, hidden: int, seed: int = 0) -> int:
    """Write a native checkpoint of a bare SoftMoE layer, one expert at a time. Returns its size in bytes.

    The same file `moe_prune.save` would write for such a layer (header layout aside: tensors in name order),
    with the layer's own initialization: experts uniform in +-1/sqrt(fan_in), Phi ~ N(0, 1/D), biases 0, scale 1.
    """
    import torch

    from moe_prune import SoftMoE, SoftMoEConfig
    from moe_prune.core.checkpoint import FORMAT_VERSION, NATIVE_KEY
    from moe_prune.core.models import model_spec

    with torch.device("meta"):  # names, shapes and spec, no memory
        layer = SoftMoE(SoftMoEConfig(dim=dim, num_experts=experts, slots_per_expert=1, hidden=hidden))
    shapes = {name: list(t.shape) for name, t in sorted(layer.state_dict().items())}
    record = {"format_version": FORMAT_VERSION, "spec": model_spec(layer), "meta": {"made_by": "compress_memory.py"}}
    header, offset = {"__metadata__": {"format": "pt", NATIVE_KEY: json.dumps(record, sort_keys=True)}}, 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors aligns the data region to 8 bytes

    gen = torch.Generator().manual_seed(seed)
    bound = {"experts.w1": 1 / math.sqrt(dim), "experts.w2": 1 / math.sqrt(hidden)}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shape in shapes.items():
            if name in bound:  # [E, D, H] / [E, H, D]: one expert's matrix at a time
                for _ in range(shape[0]):
                    f.write(torch.empty(shape[1:]).uniform_(-bound[name], bound[name], generator=gen).numpy())
            elif name == "phi":
                f.write((torch.randn(shape, generator=gen) / math.sqrt(dim)).numpy())
            elif name == "scale":
                f.write(torch.ones(shape).numpy())
            else:  # biases
                f.write(torch.zeros(shape).numpy())
    return path.stat().st_size


# -- one measured job per child process ------------------------------------------------------------------------


def _child(job: str, src: str, out: str, ids: list[int]) -> None:
    """Run one job, then print {"seconds", "vm_hwm_kb"} as JSON on the last line."""
    t0 = time.perf_counter()
    import torch

    import moe_prune
    from moe_prune.core.checkpoint import native_info
    from moe_prune.compression.compress import compress_file, compress_model

    if job == "baseline":
        native_info(src)
    elif job == "compress_file":
        compress_file(src, {"": ids}, out)
    elif job == "naive":
        model = moe_prune.load(src)
        moe_prune.save(compress_model(model, {"": torch.tensor(ids)}), out)
    else:
        raise SystemExit(f"unknown job {job}")
    seconds = time.perf_counter() - t0
    status = pathlib.Path("/proc/self/status").read_text()
    hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), None)
    print(json.dumps({"seconds": seconds, "vm_hwm_kb": hwm}))


def measure(job: str, src: pathlib.Path, out: pathlib.Path, ids: list[int]) -> dict:
    """Peak RSS of a fresh process running `job`, in MiB: its /proc VmHWM (ru_maxrss from os.wait4 beside it)."""
    proc = subprocess.Popen([sys.executable, __file__, "--child", job, str(src), str(out), json.dumps(ids)],
                            stdout=subprocess.PIPE, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the {job} child failed with status {proc.returncode}")
    report = json.loads(stdout.strip().splitlines()[-1])
    # VmHWM counts only the child's own image; ru_maxrss can also count the parent's pages shared at fork.
    peak = report["vm_hwm_kb"] / 1024 if report["vm_hwm_kb"] else usage.ru_maxrss / 1024
    return {"job": job, "peak_rss_mib": peak, "ru_maxrss_mib": usage.ru_maxrss / 1024, "seconds": report["seconds"]}


def same_tensors(a: pathlib.Path, b: pathlib.Path) -> bool:
    import torch
    from safetensors import safe_open

    with safe_open(str(a), framework="pt") as fa, safe_open(str(b), framework="pt") as fb:
        return set(fa.keys()) == set(fb.keys()) and all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())  # noqa: SIM118


# -- main ------------------------------------------------------------------------------------------------------


def _available_memory() -> int | None:
    try:
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=1024, help="D (default 1024)")
    parser.add_argument("--experts", type=int, default=128, help="E (default 128)")
    parser.add_argument("--hidden", type=int, default=2048, help="H (default 2048)")
    parser.add_argument("--keep-every", type=int, default=8, help="keep E / this many experts (default 8: 1/8)")
    parser.add_argument("--workdir", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()),
                        help="where the multi-GB checkpoint goes (deleted at the end)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive path (it holds the whole model)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "compress_memory.json",
                        help="the JSON result (the .md goes beside it)")
    parser.add_argument("--child", nargs=4, metavar=("JOB", "SRC", "OUT", "IDS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        job, src, out, ids = args.child
        _child(job, src, out, json.loads(ids))
        return 0

    import torch

    from moe_prune.measurement.timing import environment
    from moe_prune.measurement.reports import write_json, write_text

    env = environment()
    # what environment() cannot see: the niceness and thread settings the run was started with
    prefix = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ)
    niceness = os.nice(0)
    env["command"] = " ".join(filter(None, [prefix, f"nice -n {niceness}" if niceness else "", env["command"]]))
    E, D, H = args.experts, args.dim, args.hidden
    size = 4 * (E * (D * H + H + H * D + D) + D * E + 1)  # w1, b1, w2, b2, phi, scale
    free = shutil.disk_usage(args.workdir).free
    if free < 3 * size:
        print(f"skipped: {args.workdir} has {free / MiB:.0f} MiB free; this run needs 3x the checkpoint "
              f"({3 * size / MiB:.0f} MiB). Pass --workdir, or smaller --dim/--experts/--hidden.")
        return 0
    memory = _available_memory()
    naive = not args.no_naive
    if naive and memory is not None and memory < 2.5 * size:
        print(f"the naive path is skipped: {memory / MiB:.0f} MiB of memory available, it needs about "
              f"{2.5 * size / MiB:.0f} MiB")
        naive = False

    folder = pathlib.Path(tempfile.mkdtemp(prefix="compress_memory.", dir=args.workdir))
    try:
        src = folder / "layer.safetensors"
        t0 = time.perf_counter()
        size = write_layer_checkpoint(src, D, E, H)
        print(f"wrote {src}: {size / MiB:.0f} MiB in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        k = max(1, E // args.keep_every)
        ids = sorted(torch.randperm(E, generator=torch.Generator().manual_seed(0))[:k].tolist())
        rows = [measure("baseline", src, folder / "unused.safetensors", ids)]
        outputs = {"compress_file": folder / "small.compress_file.safetensors"}
        if naive:
            outputs["naive"] = folder / "small.naive.safetensors"
        for job, out in outputs.items():
            print(f"running {job} ...", file=sys.stderr)
            rows.append(measure(job, src, out, ids))
        out_size = outputs["compress_file"].stat().st_size
        identical = same_tensors(outputs["compress_file"], outputs["naive"]) if naive else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    base = rows[0]["peak_rss_mib"]
    for r in rows:
        r["over_baseline_mib"] = r["peak_rss_mib"] - base
        r["over_baseline_per_input"] = r["over_baseline_mib"] * MiB / size
        r["over_baseline_per_output"] = r["over_baseline_mib"] * MiB / out_size
    labels = {"baseline": "baseline (import + read header)", "compress_file": "compress_file (slices)",
              "naive": "load + compress_model + save"}
    head = ["path", "peak RSS MiB", "over baseline MiB", "/ input", "/ output", "seconds (with imports)"]
    table = [[labels[r["job"]], f"{r['peak_rss_mib']:.0f}", f"{r['over_baseline_mib']:.0f}",
              f"{r['over_baseline_per_input']:.2f}", f"{r['over_baseline_per_output']:.2f}", f"{r['seconds']:.1f}"]
             for r in rows]
    widths = [max(len(head[i]), *(len(row[i]) for row in table)) for i in range(len(head))]
    text = "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in [head, *table])
    summary = (f"input {size / MiB:.0f} MiB (SoftMoE D={D}, E={E}, H={H}, float32), keep {k} of {E} experts, "
               f"output {out_size / MiB:.0f} MiB")
    if naive:
        ratio = rows[2]["over_baseline_mib"] / rows[1]["over_baseline_mib"]
        summary += f"; the naive path takes {ratio:.1f}x the memory of compress_file (over the baseline)"
        summary += "; same tensors written: " + ("yes" if identical else "NO")
    print(summary)
    print(text)

    record = dict(env, question="peak RSS of compress_file against load + compress_model + save",
                  config={"dim": D, "experts": E, "hidden": H, "slots_per_expert": 1, "expert": "gelu_mlp",
                          "kept": k, "kept_ids": ids},
                  input_bytes=size, output_bytes=out_size, rows=rows, same_tensors=identical, summary=summary,
                  measured_with="peak_rss_mib: each child's /proc VmHWM; ru_maxrss_mib: os.wait4 (may include "
                                "the parent's pages shared at fork)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, record)
    md = (f"# compress_memory\n\nCommand: `{env['command']}`\n\n{env['device']}, torch {env['torch']}, "
          f"python {env['python']}, git {env.get('git_commit')}\n\n{summary}.\n\n"
          f"| {' | '.join(head)} |\n|{'|'.join('---' for _ in head)}|\n"
          + "\n".join(f"| {' | '.join(row)} |" for row in table) + "\n\n"
          "Peak RSS: VmHWM of each child process (a fresh interpreter per path). \"/ input\" and \"/ output\": "
          "memory over the baseline divided by the checkpoint sizes.\n")
    write_text(args.out.with_suffix(".md"), md)
    print(f"\nwrote {args.out}, {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
