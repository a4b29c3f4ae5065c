"""8-bit experts: which ONNX form runs them, and what int8 gives against fp32 (accuracy, bytes, latency).

Question 1 (--part forms): ONNX Runtime's CPU provider has no weight-only int8 matmul for stacked [E, D, H]
weights, and its weight-only quantizers skip non-2-D MatMuls. Which graph form of a compressed layer's experts
(16 kept of 128; slots [16, B, D] -> [16, B, D]; B rows per expert, one slot each) runs fastest at batch 1 and 32,
how far is each from the float64 dequantized experts, and does an input's answer depend on its batch mates?
    fp32                    stacked MatMul + Add, Gelu, MatMul + Add (the float experts)
    int8 Cast (folded)      int8 initializers -> Cast -> MatMul, scale on the outputs; ONNX Runtime folds the
                            Cast at load (fp32 weights in memory, exact)
    DequantizeLinear        blocked DequantizeLinear (opset 21) of the stack each run -> MatMul (exact)
    MatMulNBits acc0/acc4   com.microsoft, bits 8, per expert 2-D; acc0: float activations (exact), acc4: int8
                            activations per block of K
    DynamicQuantizeMatMul   com.microsoft, per expert; uint8 activations, one scale per expert's whole batch
    QMoE                    com.microsoft, one op: rows [16*B, D], one-hot routing (k 1, weight 1), 8-bit per column
    MatMulInteger batched   int8 activation rows (one scale per row) x the stacked int8 weights, one 3-D op
    MatMulInteger per expert  int8 activation rows, one MatMulInteger per expert with its constant 2-D weight
                            (prepacked by ONNX Runtime), scales and bias batched (StackedExperts traced)
    moe-prune export        what `export` writes (StackedExperts traced): MatMulInteger per expert from
                            ExecutionPolicy.graph_int8_min weights per expert, below it int8 Cast (folded)
Question 2 (--part models): the bundled Fashion-MNIST model and trained Soft MoE ViTs, compressed (1/8 of the
experts, --rule mass, healed and not) in fp32 and int8: test accuracy in torch (float activations: the
dequantized model), in ONNX Runtime (the graph `export` writes) and in torch with int8 activations (the numerics of
a large experts' graph, forced here whatever the experts' size), expert bytes, and batch-1 / batch-32 latency of full fp32,
compressed fp32 and compressed int8 in both engines beside the weight-bytes bound; and a ViT-S/16-sized Soft MoE
layer with random weights for bytes and latency.

    python benchmarks/quantize_int8.py --part forms --min-seconds 0.5
    python benchmarks/quantize_int8.py --part models --vit runs/fmnist-vit2/vit-e32-s10.safetensors \
        runs/fmnist-vit2/vit-e8-s10.safetensors --vit-keep 1/8 1/4
Results: benchmarks/results/quantize_int8_forms.{json,md}, quantize_int8_models.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import pathlib
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import moe_prune
from moe_prune.core.experts import StackedExperts
from moe_prune.compression.quantize import quantize_, quantize_file
from moe_prune.measurement.reports import table, write_json, write_text
from moe_prune.measurement.timing import BenchConfig, alternate, bench_models, ort_session
from moe_prune.measurement.timing import environment as bench_environment

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHAPES = {"vit_s16": (384, 1536), "d256_h512": (256, 512), "d128_h512": (128, 512), "vit_e8": (64, 512),
          "vit_e32": (64, 128), "default": (196, 6)}  # D, H
OPSETS = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]


# -- question 1: the graph forms ------------------------------------------------------------------------------


def expert_stack(K: int, D: int, H: int) -> StackedExperts:
    """K int8 GELU experts with biases, quantized from random float weights."""
    from moe_prune.core.layers import SoftMoE, SoftMoEConfig

    layer = SoftMoE(SoftMoEConfig(dim=D, num_experts=K, slots_per_expert=1, hidden=H)).eval()
    with torch.no_grad():
        for p in (layer.experts.b1, layer.experts.b2):
            p.normal_(0, 0.1)
    return quantize_(layer).experts


def reference64(e: StackedExperts, x: np.ndarray) -> np.ndarray:
    """The float64 dequantized experts: gelu(x q1 s1 + b1) q2 s2 + b2 (exact erf GELU)."""
    w1 = e.w1.double() * e.w1_scale.double().unsqueeze(1)
    w2 = e.w2.double() * e.w2_scale.double().unsqueeze(1)
    h = torch.from_numpy(x).double() @ w1 + e.b1.double().unsqueeze(1)
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return (h @ w2 + e.b2.double().unsqueeze(1)).numpy()


def _model(nodes, inits, K, D, path) -> str:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [K, "n", D])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [K, "n", D])
    onnx.save(helper.make_model(helper.make_graph(nodes, "experts", [x], [y], inits), opset_imports=OPSETS), str(path))
    return str(path)


def _arrays(e: StackedExperts) -> dict:
    t = lambda v: v.detach().numpy()  # noqa: E731
    return dict(q1=t(e.w1), q2=t(e.w2), s1=t(e.w1_scale), s2=t(e.w2_scale), b1=t(e.b1), b2=t(e.b2))


def form_fp32(e, path):
    a = _arrays(e)
    w1, w2 = a["q1"] * a["s1"][:, None], a["q2"] * a["s2"][:, None]  # the dequantized weights, as fp32
    K, D, H = w1.shape
    n = helper.make_node
    return _model([n("MatMul", ["x", "w1"], ["h0"]), n("Add", ["h0", "b1"], ["h1"]), n("Gelu", ["h1"], ["h2"]),
                   n("MatMul", ["h2", "w2"], ["y0"]), n("Add", ["y0", "b2"], ["y"])],
                  [numpy_helper.from_array(w1.astype(np.float32), "w1"), numpy_helper.from_array(w2.astype(np.float32), "w2"),
                   numpy_helper.from_array(a["b1"][:, None], "b1"), numpy_helper.from_array(a["b2"][:, None], "b2")], K, D, path)


def _scaled_inits(a):
    return [numpy_helper.from_array(a["q1"], "q1"), numpy_helper.from_array(a["q2"], "q2"),
            numpy_helper.from_array(a["s1"][:, None], "s1"), numpy_helper.from_array(a["s2"][:, None], "s2"),
            numpy_helper.from_array(a["b1"][:, None], "b1"), numpy_helper.from_array(a["b2"][:, None], "b2")]


def form_cast(e, path):
    a = _arrays(e)
    K, D, H = a["q1"].shape
    n = helper.make_node
    return _model([n("Cast", ["q1"], ["c1"], to=TensorProto.FLOAT), n("MatMul", ["x", "c1"], ["h0"]),
                   n("Mul", ["h0", "s1"], ["h0s"]), n("Add", ["h0s", "b1"], ["h1"]), n("Gelu", ["h1"], ["h2"]),
                   n("Cast", ["q2"], ["c2"], to=TensorProto.FLOAT), n("MatMul", ["h2", "c2"], ["y0"]),
                   n("Mul", ["y0", "s2"], ["y0s"]), n("Add", ["y0s", "b2"], ["y"])], _scaled_inits(a), K, D, path)


def form_dequantize_linear(e, path):
    a = _arrays(e)
    K, D, H = a["q1"].shape
    n = helper.make_node
    return _model([n("DequantizeLinear", ["q1", "s1"], ["d1"], axis=1, block_size=D), n("MatMul", ["x", "d1"], ["h0"]),
                   n("Add", ["h0", "b1"], ["h1"]), n("Gelu", ["h1"], ["h2"]),
                   n("DequantizeLinear", ["q2", "s2"], ["d2"], axis=1, block_size=H), n("MatMul", ["h2", "d2"], ["y0"]),
                   n("Add", ["y0", "b2"], ["y"])], _scaled_inits(a), K, D, path)


def _nbits(q: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """q [I, O] int8, s [O] -> MatMulNBits' B [O, 1, block] uint8 (q + 128, zero-padded to the block; its default
    zero point is 128), scales [O, 1], block: the power of two >= max(I, 16), so one block is one output channel."""
    i, o = q.shape
    block = max(16, 1 << (i - 1).bit_length())
    b = np.full((o, 1, block), 128, np.uint8)
    b[:, 0, :i] = (q.T.astype(np.int16) + 128).astype(np.uint8)
    return b, s[:, None].astype(np.float32), block


def form_nbits(e, path, accuracy_level: int):
    a = _arrays(e)
    K, D, H = a["q1"].shape
    n = helper.make_node
    nodes = [n("Split", ["x"], [f"x{k}" for k in range(K)], axis=0, num_outputs=K)]
    inits = []
    for k in range(K):
        B1, S1, bl1 = _nbits(a["q1"][k], a["s1"][k])
        B2, S2, bl2 = _nbits(a["q2"][k], a["s2"][k])
        inits += [numpy_helper.from_array(v, f"{name}_{k}") for name, v in
                  (("B1", B1), ("S1", S1), ("b1", a["b1"][k]), ("B2", B2), ("S2", S2), ("b2", a["b2"][k]))]
        nodes += [n("MatMulNBits", [f"x{k}", f"B1_{k}", f"S1_{k}", "", "", f"b1_{k}"], [f"h{k}"], domain="com.microsoft",
                    K=D, N=H, bits=8, block_size=bl1, accuracy_level=accuracy_level),
                  n("Gelu", [f"h{k}"], [f"g{k}"]),
                  n("MatMulNBits", [f"g{k}", f"B2_{k}", f"S2_{k}", "", "", f"b2_{k}"], [f"y{k}"], domain="com.microsoft",
                    K=H, N=D, bits=8, block_size=bl2, accuracy_level=accuracy_level)]
    nodes.append(n("Concat", [f"y{k}" for k in range(K)], ["y"], axis=0))
    return _model(nodes, inits, K, D, path)


def form_dynamic_quantize_matmul(e, path):
    a = _arrays(e)
    K, D, H = a["q1"].shape
    n = helper.make_node
    nodes = [n("Split", ["x"], [f"x{k}" for k in range(K)], axis=0, num_outputs=K)]
    inits = []
    for k in range(K):
        inits += [numpy_helper.from_array(a[name][k], f"{name}_{k}") for name in ("q1", "s1", "b1", "q2", "s2", "b2")]
        nodes += [n("DynamicQuantizeMatMul", [f"x{k}", f"q1_{k}", f"s1_{k}", "", f"b1_{k}"], [f"h{k}"], domain="com.microsoft"),
                  n("Gelu", [f"h{k}"], [f"g{k}"]),
                  n("DynamicQuantizeMatMul", [f"g{k}", f"q2_{k}", f"s2_{k}", "", f"b2_{k}"], [f"y{k}"], domain="com.microsoft")]
    nodes.append(n("Concat", [f"y{k}" for k in range(K)], ["y"], axis=0))
    return _model(nodes, inits, K, D, path)


def form_qmoe(e, path):
    """One QMoE over all rows: each row's router row is one-hot on its own expert (k 1) and its routing weight 1,
    so the op computes exactly one expert per row, as a compressed layer's slots need."""
    a = _arrays(e)
    K, D, H = a["q1"].shape
    n = helper.make_node
    u8 = lambda q: (q.transpose(0, 2, 1).astype(np.int16) + 128).astype(np.uint8)  # noqa: E731  [E, out, in]
    nodes = [n("Reshape", ["x", "rows_shape"], ["rows"]), n("Shape", ["x"], ["shape"]),
             n("Slice", ["shape", "one", "two"], ["n"]), n("Concat", ["K", "n", "K"], ["knk"], axis=0),
             n("Expand", ["eye", "knk"], ["onehot3"]), n("Reshape", ["onehot3", "probs_shape"], ["probs"]),
             n("QMoE", ["rows", "probs", "W1", "s1", "b1", "W2", "s2", "b2", "", "", "", "", "", "", "probs"], ["y_rows"],
               domain="com.microsoft", k=1, activation_type="gelu", expert_weight_bits=8, normalize_routing_weights=0),
             n("Reshape", ["y_rows", "shape"], ["y"])]
    inits = [numpy_helper.from_array(np.array([-1, D], np.int64), "rows_shape"),
             numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.array([2], np.int64), "two"),
             numpy_helper.from_array(np.array([K], np.int64), "K"),
             numpy_helper.from_array(np.eye(K, dtype=np.float32)[:, None, :], "eye"),
             numpy_helper.from_array(np.array([-1, K], np.int64), "probs_shape"),
             numpy_helper.from_array(u8(a["q1"]), "W1"), numpy_helper.from_array(a["s1"], "s1"), numpy_helper.from_array(a["b1"], "b1"),
             numpy_helper.from_array(u8(a["q2"]), "W2"), numpy_helper.from_array(a["s2"], "s2"), numpy_helper.from_array(a["b2"], "b2")]
    return _model(nodes, inits, K, D, path)


class _Experts(torch.nn.Module):
    def __init__(self, experts: StackedExperts, per_expert: bool):
        super().__init__()
        self.experts, self.per_expert = experts, per_expert

    def forward(self, x):  # [K, N, D]
        if self.per_expert:
            return self.experts(x)  # the layer's own stack: what `export` writes for a compressed layer
        return self.experts(x, torch.arange(x.shape[0]))  # gathered: one batched MatMulInteger over the stack


def form_torch_export(e, path, per_expert: bool, int8_activations: bool | None):
    """The graph moe-prune's exporter writes for these experts (int8_activations None: its choice by size)."""
    from moe_prune.onnx.export import _int8_weights_as_cast

    e = copy.deepcopy(e)
    e.int8_activations = int8_activations
    K, D = e.w1.shape[0], e.w1.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Experts(e, per_expert), (torch.randn(K, 2, D),), str(path), input_names=["x"], output_names=["y"],
                          opset_version=18, dynamo=False, dynamic_axes={"x": {1: "n"}, "y": {1: "n"}})
    proto = onnx.load(str(path))
    _int8_weights_as_cast(proto)
    onnx.save(proto, str(path))
    return str(path)


FORMS = {
    "fp32": form_fp32,
    "int8 Cast (folded)": form_cast,
    "DequantizeLinear": form_dequantize_linear,
    "MatMulNBits acc0": lambda e, p: form_nbits(e, p, 0),
    "MatMulNBits acc4": lambda e, p: form_nbits(e, p, 4),
    "DynamicQuantizeMatMul": form_dynamic_quantize_matmul,
    "QMoE": form_qmoe,
    "MatMulInteger batched": lambda e, p: form_torch_export(e, p, per_expert=False, int8_activations=True),
    "MatMulInteger per expert": lambda e, p: form_torch_export(e, p, per_expert=True, int8_activations=True),
    "moe-prune export": lambda e, p: form_torch_export(e, p, per_expert=True, int8_activations=None),
}


def weight_bytes(path: str) -> int:
    """Bytes of the graph's initializers (what a session must hold before any folding or prepacking)."""
    return sum(t.ByteSize() for t in onnx.load(path).graph.initializer)


def part_forms(args) -> tuple[list, str]:
    ort.set_global_thread_pool_sizes(args.threads, 1)  # one pool for every timed session (see timing._time_onnx)
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        for shape in args.shapes:
            D, H = SHAPES[shape]
            e = expert_stack(args.keep, D, H)
            paths = {name: make(e, pathlib.Path(tmp) / f"{shape}-{i}.onnx") for i, (name, make) in enumerate(FORMS.items())}
            sessions = {name: ort_session(p, "cpu", shared_threads=True) for name, p in paths.items()}
            for batch in args.batches:
                x = np.random.default_rng(batch).standard_normal((args.keep, batch, D)).astype(np.float32)
                ref = reference64(e, x)
                stats = {}
                for name, s in sessions.items():
                    y = s.run(None, {"x": x})[0]
                    alone = s.run(None, {"x": x[:, :1]})[0]  # the first input without its batch mates
                    stats[name] = {"rel_rms_error": float(np.sqrt(((y - ref) ** 2).mean() / (ref ** 2).mean())),
                                   "batch_independent": bool(np.abs(alone - y[:, :1]).max() <= 1e-6 * np.abs(ref).max()),
                                   "weight_mb": weight_bytes(paths[name]) / 1e6}
                feed = {"x": x}
                timing = alternate({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()},
                                   BenchConfig(warmup=3, rounds=3, iters_per_round=5, min_seconds=args.min_seconds), batch)
                for name in sessions:
                    stats[name].update(timing[name])
                rows.append({"shape": shape, "D": D, "H": H, "experts": args.keep, "batch": batch, "forms": stats})
                print(f"  {shape} batch {batch}: " + ", ".join(f"{n} {stats[n]['p50_ms']:.3f}" for n in stats), file=sys.stderr)
    head = ["experts", "batch"] + [f"{n} ms" for n in FORMS]
    body = [[f"{r['experts']} x {r['D']}x{r['H']}", r["batch"]] + [f"{r['forms'][n]['p50_ms']:.3f}" for n in FORMS] for r in rows]
    head2 = ["form", "weights MB (" + ", ".join(args.shapes) + ")", "rel. RMS error vs float64", "batch-independent"]
    body2 = [[n, " / ".join(f"{r['forms'][n]['weight_mb']:.2f}" for r in rows if r["batch"] == args.batches[0]),
              " / ".join(f"{r['forms'][n]['rel_rms_error']:.1e}" for r in rows),
              "yes" if all(r["forms"][n]["batch_independent"] for r in rows) else "no"] for n in FORMS]
    text = table(body, head) + "\n\n" + table(body2, head2)
    md = table(body, head, markdown=True) + "\n\n" + table(body2, head2, markdown=True)
    conclusion = _forms_conclusion(rows)
    return rows, text + "\n\n" + conclusion, md + "\n\n" + conclusion


def _forms_conclusion(rows: list) -> str:
    """Per shape and batch: the fastest form, the fastest of those whose answers do not depend on the batch, and
    what `export` wrote; then the rule that follows (ExecutionPolicy.graph_int8_min)."""
    from moe_prune.core.experts import CPU_POLICY

    # independent of the batch: checked at every batch size above 1 (at batch 1 there are no batch mates)
    steady_forms = [n for n in FORMS if n != "fp32" and all(r["forms"][n]["batch_independent"] for r in rows)]
    lines = ["Per shape and batch: fastest form; fastest int8 form whose answers do not depend on the batch; "
             "what moe-prune export wrote, against fp32:"]
    for r in rows:
        f = r["forms"]
        fastest = min(f, key=lambda n: f[n]["p50_ms"])
        steady = min(steady_forms, key=lambda n: f[n]["p50_ms"])
        ours = f["moe-prune export"]["p50_ms"]
        lines.append(f"- {r['experts']} x {r['D']}x{r['H']} ({r['D'] * r['H'] * 2} weights each), batch {r['batch']}: "
                     f"{fastest} {f[fastest]['p50_ms']:.3f} ms; {steady} {f[steady]['p50_ms']:.3f} ms; export "
                     f"{ours:.3f} ms = {f['fp32']['p50_ms'] / ours:.2f}x fp32")
    lines.append(f"Chosen (ExecutionPolicy.graph_int8_min = {CPU_POLICY.graph_int8_min} weights per expert): from that "
                 "size, int8 activation rows and one MatMulInteger per expert, the fastest form whose answers do not "
                 "depend on the batch and the one torch computes to the same integers; below it, the int8 weights "
                 "cast to float (folded by ONNX Runtime at load: fp32 speed, a quarter of the file), since integer "
                 "matmuls were slower there at batch 1. DynamicQuantizeMatMul (one activation scale per expert's batch) and "
                 "MatMulNBits with int8 activations change an input's answer with its batch mates; the exact "
                 "weight-only forms (DequantizeLinear, MatMulNBits acc0) are slower than fp32; QMoE is slower and "
                 "its GELU is the tanh approximation.")
    return "\n".join(lines)


# -- question 2: the models --------------------------------------------------------------------------------------


class _Session(torch.nn.Module):
    """An ONNX Runtime session behind a torch forward, so that evaluate.accuracy feeds it what it feeds torch."""

    def __init__(self, path, model):
        super().__init__()
        self.session = ort_session(path, "cpu")
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # the device evaluate asks for
        self.config = model.config  # the preprocessing of the model it came from

    def forward(self, x):
        return torch.from_numpy(self.session.run(None, {"input": x.numpy()})[0])


def _accuracy(model, test):
    from moe_prune.measurement.accuracy import accuracy

    return accuracy(model, *test, batch_size=500)


def _costs(models: dict) -> dict:
    from moe_prune.core.flops import model_cost

    return {name: model_cost(m) for name, m in models.items()}


def one_family(name: str, src: pathlib.Path, work: pathlib.Path, test, args, heal_steps: int | None,
               keep: str = "1/8") -> dict:
    """Compress `src` (keep, rule mass, on 2,000 Fashion-MNIST training images; healed if heal_steps), quantize
    the compressed file, measure accuracy (torch, ONNX Runtime), bytes and latency of full / fp32 / int8."""
    from moe_prune.compression.compress import compress_from_data
    from moe_prune.core.experts import CPU_POLICY, set_policy
    from moe_prune.onnx.export_file import VALIDATION_TOLERANCE, export_checkpoint
    from moe_prune.onnx.export import example_input, export_onnx
    from moe_prune.compression.healing import HealConfig
    from moe_prune.onnx.validate import validate_onnx

    tag = f"{name}{'.healed' if heal_steps else ''}"
    fp32 = work / f"{tag}.keep{keep.replace('/', 'of')}.safetensors"
    t0 = time.perf_counter()
    heal = HealConfig(steps=heal_steps) if heal_steps else None
    compress_from_data(src, fp32, keep, "fashion-mnist", calib_limit=args.calib_limit, rule="mass", heal=heal)
    int8 = fp32.with_name(fp32.name.replace(".safetensors", ".int8.safetensors"))
    quantize_file(fp32, int8)  # what `moe-prune compress FP32 --quantize int8` does: the same experts, quantized
    seconds = time.perf_counter() - t0
    files = {"full fp32": src, "compressed fp32": fp32, "compressed int8": int8}
    models = {k: moe_prune.load(p) for k, p in files.items()}
    onnx_paths, reports = {}, {}
    for k, p in files.items():
        out = work / f"{tag}.{k.replace(' ', '-')}.onnx"
        _, report = export_checkpoint(p, out)
        report.raise_for_failure()
        onnx_paths[k], reports[k] = out, {"atol": report.atol, "rtol": report.rtol,
                                         "max_abs": max(c.max_abs for c in report.checks)}
    # The integer-matmul graph and numerics of large experts, forced here whatever these experts' size.
    act = "compressed int8 (int8 activations)"
    forced = set_policy(moe_prune.load(int8), CPU_POLICY, graph_int8_min=0)
    onnx_paths[act] = export_onnx(forced, work / f"{tag}.compressed-int8-act.onnx")
    report = validate_onnx(onnx_paths[act], forced, atol=VALIDATION_TOLERANCE["int8"][0], rtol=VALIDATION_TOLERANCE["int8"][1])
    reports[act] = {"atol": report.atol, "rtol": report.rtol, "max_abs": max(c.max_abs for c in report.checks),
                    "MatMulInteger": report.ops.get("MatMulInteger", 0)}
    int8_act = copy.deepcopy(models["compressed int8"])
    for m in int8_act.modules():
        if isinstance(m, StackedExperts):
            m.int8_activations = True
    acc = {f"torch {k}": _accuracy(m, test) for k, m in models.items()}
    acc[f"torch {act}"] = _accuracy(int8_act, test)
    for k in ("compressed fp32", "compressed int8", act):
        acc[f"onnxruntime {k}"] = _accuracy(_Session(onnx_paths[k], forced if k == act else models[k]), test)
    summaries = {k: moe_prune.summary(p) for k, p in files.items()}
    costs = _costs(models)
    result = {"name": f"{tag} keep {keep}", "source": str(src), "keep": keep, "heal_steps": heal_steps,
              "compress_seconds": seconds,
              "accuracy": acc, "validation": reports,
              "bytes": {k: {"expert_bytes": s["expert_bytes"], "weight_bytes": s["weight_bytes"], "file_bytes": s["bytes"]}
                        for k, s in summaries.items()},
              "bound_weight_bytes": {k: c.total_weight_bytes() for k, c in costs.items()},
              "flops": {k: c.total_flops for k, c in costs.items()}}
    if not args.no_latency:
        torch_models = {**models, "compressed int8 (int8 activations)": int8_act}
        result["latency"] = bench_models(onnx_paths, torch_models,
                                         lambda b: example_input(models["full fp32"], b, torch.Generator().manual_seed(b)),
                                         _bench_config(args), progress=True)
    return result


def vit_s16_layer(work: pathlib.Path, args) -> dict:
    """A ViT-S/16-sized Soft MoE layer (D 384, 128 GELU experts of hidden 1536, 197 tokens), random weights, 16
    experts kept: bytes and latency only."""
    from moe_prune.compression.compress import compress_model
    from moe_prune.onnx.export import export_onnx
    from moe_prune.core.layers import SoftMoE, SoftMoEConfig
    from moe_prune.onnx.validate import validate_onnx

    torch.manual_seed(0)
    full = SoftMoE(SoftMoEConfig(dim=384, num_experts=128, slots_per_expert=1, hidden=1536)).eval()
    small = compress_model(full, {"": torch.randperm(128)[:16].sort().values})
    int8 = quantize_(copy.deepcopy(small))
    models = {"full fp32": full, "compressed fp32": small, "compressed int8": int8}
    example = torch.randn(2, 197, 384)
    onnx_paths = {}
    from moe_prune.onnx.export_file import VALIDATION_TOLERANCE

    validation = {}
    for k, m in models.items():
        out = work / f"vit_s16_layer.{k.replace(' ', '-')}.onnx"
        export_onnx(m, out, example=example)
        atol, rtol = VALIDATION_TOLERANCE["int8"] if "int8" in k else (1e-4, 1e-3)
        report = validate_onnx(out, m, atol=atol, rtol=rtol, batch_sizes=(1, 2), n_batches=1)
        validation[k] = {"atol": atol, "rtol": rtol, "max_abs": max(c.max_abs for c in report.checks),
                         "MatMulInteger": report.ops.get("MatMulInteger", 0)}
        onnx_paths[k] = out
    from moe_prune.core.flops import model_cost

    costs = {k: model_cost(m, tokens=197) for k, m in models.items()}
    expert_bytes = {k: sum(t.numel() * t.element_size() for n, t in m.state_dict().items() if n.startswith("experts."))
                    for k, m in models.items()}
    result = {"name": "vit_s16_layer (random weights)", "validation": validation,
              "bytes": {k: {"expert_bytes": b} for k, b in expert_bytes.items()},
              "bound_weight_bytes": {k: c.total_weight_bytes() for k, c in costs.items()},
              "flops": {k: c.total_flops for k, c in costs.items()}}
    if not args.no_latency:
        int8_act = copy.deepcopy(int8)
        int8_act.experts.int8_activations = True
        result["latency"] = bench_models(onnx_paths, {**models, "compressed int8 (int8 activations)": int8_act},
                                         lambda b: torch.randn(b, 197, 384, generator=torch.Generator().manual_seed(b)),
                                         _bench_config(args), progress=True)
    return result


def _bench_config(args) -> BenchConfig:
    return BenchConfig(batch_sizes=tuple(args.batches), warmup=3, rounds=3, iters_per_round=5,
                       min_seconds=args.min_seconds, threads=args.threads)


def _models_tables(results: list) -> tuple[str, str]:
    def pct(v):
        return f"{100 * v:.2f}"

    acc_head = ["model", "full fp32", "compressed fp32", "int8 torch", "change", "int8 ONNX Runtime", "change",
                "int8 act. ONNX Runtime", "change", "int8 act. torch", "change"]
    acc_rows = []
    for r in results:
        if "accuracy" not in r:
            continue
        a = r["accuracy"]
        base = a["torch compressed fp32"]
        row = [r["name"], pct(a["torch full fp32"]), pct(base)]
        for key in ("torch compressed int8", "onnxruntime compressed int8",
                    "onnxruntime compressed int8 (int8 activations)", "torch compressed int8 (int8 activations)"):
            row += [pct(a[key]), f"{100 * (a[key] - base):+.2f}"]
        acc_rows.append(row)
    byte_head = ["model", "expert bytes fp32", "expert bytes int8", "int8 / fp32", "weight bytes full", "weight bytes int8",
                 "bytes bound full/int8", "bytes bound fp32/int8"]
    byte_rows = []
    for r in results:
        b, w = r["bytes"], r["bound_weight_bytes"]
        byte_rows.append([r["name"], b["compressed fp32"]["expert_bytes"], b["compressed int8"]["expert_bytes"],
                          f"{b['compressed int8']['expert_bytes'] / b['compressed fp32']['expert_bytes']:.3f}",
                          int(w["full fp32"]), int(w["compressed int8"]), f"{w['full fp32'] / w['compressed int8']:.2f}x",
                          f"{w['compressed fp32'] / w['compressed int8']:.2f}x"])
    lat_head = ["model", "engine", "batch", "full ms", "fp32 ms", "int8 ms", "int8 act. ms", "int8 vs fp32",
                "int8 vs full", "bytes bound vs full"]
    lat_rows = []
    for r in results:
        if "latency" not in r:
            continue
        w = r["bound_weight_bytes"]
        for engine in ("onnxruntime", "torch"):
            for bs, stats in r["latency"][engine].items():
                ms = {k: v["p50_ms"] for k, v in stats.items()}
                act = ms.get("compressed int8 (int8 activations)")
                lat_rows.append([r["name"], engine, bs, f"{ms['full fp32']:.3f}", f"{ms['compressed fp32']:.3f}",
                                 f"{ms['compressed int8']:.3f}", "" if act is None else f"{act:.3f}",
                                 f"{ms['compressed fp32'] / ms['compressed int8']:.2f}x",
                                 f"{ms['full fp32'] / ms['compressed int8']:.2f}x", f"{w['full fp32'] / w['compressed int8']:.2f}x"])
    text = "\n\n".join(table(rows, head) for rows, head in ((acc_rows, acc_head), (byte_rows, byte_head), (lat_rows, lat_head)) if rows)
    md = "\n\n".join(table(rows, head, markdown=True) for rows, head in ((acc_rows, acc_head), (byte_rows, byte_head), (lat_rows, lat_head)) if rows)
    return text, md


def part_models(args) -> tuple[list, str, str]:
    from moe_prune.data.mnist import load_images

    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="quantize_int8.") as tmp:
            args.work = pathlib.Path(tmp)
            try:
                return part_models(args)
            finally:
                args.work = None
    test = load_images("fashion-mnist", "test")
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    results = []
    sources = [] if args.no_mnist else [("mnist-e128", ROOT / "moe_prune" / "assets" / "default.safetensors", "1/8")]
    keeps = args.vit_keep * len(args.vit) if len(args.vit_keep) == 1 else args.vit_keep
    if len(keeps) != len(args.vit):
        parser_error = f"--vit-keep: give one value or one per --vit checkpoint ({len(args.vit)}), got {len(keeps)}"
        raise SystemExit(f"quantize_int8.py: error: {parser_error}")
    for path, keep in zip(args.vit, keeps):
        sources.append((path.name.split(".")[0], path, keep))
    for name, src, keep in sources:
        for steps in (None, args.heal_steps):
            print(f"[{name}] heal {steps}", file=sys.stderr, flush=True)
            results.append(one_family(name, src, work, test, args, steps, keep))
    if not args.no_vit_layer:
        print("[vit_s16 layer]", file=sys.stderr, flush=True)
        results.append(vit_s16_layer(work, args))
    text, md = _models_tables(results)
    return results, text, md


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["forms", "models"], required=True)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES), help="forms: expert shapes")
    parser.add_argument("--keep", type=int, default=16, help="forms: experts kept in the layer (default 16)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime and torch intra-op threads (default 1: "
                        "the development machine's other core runs a training job)")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="time each model at least this long per batch")
    parser.add_argument("--vit", type=pathlib.Path, nargs="+", default=[], help="models: trained Soft MoE ViT "
                        "checkpoints (28x28 Fashion-MNIST)")
    parser.add_argument("--vit-keep", nargs="+", default=["1/8"], help="models: experts each ViT keeps per layer "
                        "(one value for all, or one per --vit; default 1/8)")
    parser.add_argument("--no-mnist", action="store_true", help="models: skip the bundled Fashion-MNIST model")
    parser.add_argument("--heal-steps", type=int, default=300, help="models: distillation steps of the healed variant")
    parser.add_argument("--calib-limit", type=int, default=2000, help="models: calibration images")
    parser.add_argument("--no-latency", action="store_true", help="models: accuracy and bytes only")
    parser.add_argument("--no-vit-layer", action="store_true", help="models: skip the ViT-S/16-sized layer")
    parser.add_argument("--work", type=pathlib.Path, help="models: where the checkpoints and ONNX files go (default: a "
                        "temporary folder)")
    parser.add_argument("--out", type=pathlib.Path, help="results JSON (default benchmarks/results/quantize_int8_PART.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or RESULTS / f"quantize_int8_{args.part}.json"
    env = bench_environment()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows, text, md = part_forms(args) if args.part == "forms" else part_models(args)
    load_after = os.getloadavg()
    command = "python benchmarks/quantize_int8.py " + " ".join(sys.argv[1:] if argv is None else argv)
    note = (f"onnxruntime {ort.__version__} CPU and torch {torch.__version__}, {args.threads} thread(s) "
            f"({env['cpu']}); medians; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
            f"{time.perf_counter() - t0:.0f} s")
    print(text)
    print(note)
    write_json(out, dict(env, command=command, load_average_1min=dict(before=load_before[0], after=load_after[0]),
                         results=rows))
    title = {"forms": "int8 experts in ONNX Runtime: graph forms", "models": "int8 experts: accuracy, bytes, latency"}[args.part]
    write_text(out.with_suffix(".md"), f"# {title}\n\nCommand: `{command}`\n\n{note}\n\n{md}\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
