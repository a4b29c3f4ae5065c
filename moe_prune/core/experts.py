"""Soft MoE experts: E two-layer MLPs with stacked weights, and the ways to run them on a subset of slot rows.

    y = act(x @ w1[e] + b1[e]) @ w2[e] + b2[e]     w1 [E, D, H1], w2 [E, H, D_out]; act GELU, ReLU or GEGLU

`StackedExperts.forward` runs all experts (or a shared subset of K) on their slots [K, N, D] with batched
matmuls; `StackedExperts.grouped` runs R rows that each belong to one expert (the B*K slot groups of per-input
subsets), choosing by measurement among weights gathered per row, a padded batched matmul over the stack, a
loop over the used experts and, on CUDA, the Triton grouped-expert kernel (kernels/grouped_experts.py).
Int8 experts (`quant="int8"`, see moe_prune.compression.quantize): w1 and w2 are int8 with one scale per output channel,
w = q * scale. Eager torch runs them with float activations, converting the int8 weights expert by expert (into one
reused float tile) or, for small stacks, all at once: exactly the dequantized model. An exported graph of large
experts (and eager torch when `int8_activations` is set) also quantizes each activation row to int8 and runs
integer matmuls (ONNX MatMulInteger; torch._int_mm): ONNX Runtime has no weight-only int8 matmul on the CPU that
beats fp32. A graph of small experts casts their int8 weights to float (ExecutionPolicy.graph_int8_min).
Axes: E experts, N rows per expert, D model dim, H expert hidden, D_out output dim, R grouped rows.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError
from .mlp import ExpertKind, default_bias, expert_activation, expert_mlp, float_mlp, linear, w8a8_linear
from .tracing import compiling, in_graph


@functools.cache
def triton_available() -> bool:
    """Whether triton is installed (the CUDA kernels need it; nothing imports it before a kernel runs)."""
    return importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class ExecutionPolicy:
    """How StackedExperts runs on one kind of device: thresholds and kernel choices, measured, as data.

    Args:
        gather_limit: a shared subset gathers its experts' weights (one copy per kept expert) below this many
            weights; above it, eager runs each kept expert on its weights in place (`shared_loop`) or still gathers.
        shared_loop: above gather_limit, loop over the kept experts (their ids on the host: one sync per call).
        row_gather_limit: per-input rows gather their experts' weights per row below this many weights.
        loop_overhead: per-input rows of large experts: loop over the used experts (host sync: the used ids and
            their counts) while used * (expert weights + this) < all experts' weights; None: never loop.
        padded_capacity: per-input rows padded into an [E, C, ...] batch: C = "max" rows any expert has (one host
            sync), or "batch" (the batch size: an input keeps an expert at most once; no sync, more padding).
        graph_few_rows: a traced graph also gathers per row when its rows number at most this fraction of E.
        loop_rows: the full layer runs one matmul pair per expert from this many rows per expert; None: never.
        dequant_limit: int8 experts with float activations (eager): a stack, or a shared subset, of fewer weights
            is converted to float at once and run batched; a larger one expert by expert through one float tile.
        graph_int8_min: int8 experts in an exported graph: from this many weights per expert the activations are
            quantized too and the matmuls run on integers; smaller experts keep float activations and the graph
            converts their int8 weights (ONNX Runtime folds that into float weights when it loads the file).

    Example:
        >>> layer.experts.policy = replace(CPU_POLICY, loop_rows=None)   # this layer: never loop over experts
    """

    gather_limit: int
    shared_loop: bool
    row_gather_limit: int
    loop_overhead: int | None
    padded_capacity: str
    graph_few_rows: float
    loop_rows: int | None
    dequant_limit: int = 1 << 20
    graph_int8_min: int = 1 << 17


# Measured on a CPU (2 cores, see the README and benchmarks/):
# - gather_limit 1M floats (4 MB): gathering 16 of Chung et al.'s MNIST experts (150 KB) beat the loop 2x, and the
#   loop beat gathering 16 ViT-S experts (75 MB) 7x.
# - row_gather_limit 4M floats (16 MB): the default MNIST layer at batch 32 (512 rows of 2352 weights) took
#   0.90 ms gathered against 1.54 ms padded over the stack in torch, and 0.57 against 1.43 ms in ONNX Runtime
#   (benchmarks/per_input_cpu.py, ort_grouped_experts.py).
# - loop_overhead 128K weights: a Python loop over the used experts costs about the time to read this many
#   weights per expert beyond its matmuls (measured when the loop was written; no committed benchmark isolates
#   it: benchmarks/per_input_cpu.py times the paths it chooses between).
# - graph_few_rows 0.5: ONNX Runtime, ViT-S/16 experts, 16 rows of 128 experts: gathered 26.5 ms, padded over the
#   stack 77 ms (benchmarks/ort_grouped_experts.py).
# - loop_rows 128: 16 experts x 256 rows, D=512, H=2048: the per-expert addmm loop 1.16x faster than the batched
#   matmul; at 16-32 rows the batched matmul is as fast or faster (benchmarks/vs_libraries.py).
# - dequant_limit 1M weights: 16 int8 ViT-S experts (18.9M weights), one thread, 1 row each: converted all at once
#   48 ms, one reused tile per expert 3.1 ms (fp32 weights: 6.2 ms); a fresh float copy per expert paid page faults
#   (13-25 ms). The bundled model compressed to 16 experts (38K weights), whole model at batch 1 / 32: converted
#   at once 0.38 / 0.57 ms, tile by tile 0.61 / 1.74 ms (fp32 weights: 0.36 / 0.56 ms).
# - graph_int8_min 128K weights: ONNX Runtime (1 thread), 16 experts, int8 activation rows and integer matmuls
#   against float weights, batch 1 / 32: 384x1536 (1.2M weights each) 6.1x / 3.4x faster; 256x512 (262K) 3.7x /
#   2.8x; 128x512 (131K) 1.3x / 1.7x; 64x512 (65K) 1.4x slower / 1.1x faster; 64x128 (16K) 2.5x / 1.2x slower;
#   196x6 3.5x / 3.2x slower. Below it the cast int8 weights run exactly as fast as float ones
#   (benchmarks/results/quantize_int8_forms.md).
CPU_POLICY = ExecutionPolicy(gather_limit=1 << 20, shared_loop=True, row_gather_limit=1 << 22, loop_overhead=1 << 17,
                             padded_capacity="max", graph_few_rows=0.5, loop_rows=128)
# CUDA, until the GPU check measures it: no Python loop over experts and no host synchronisation in a call (so
# CUDA graphs and torch.compile(fullgraph=True) can take the layer): batched matmuls over gathered or padded
# weights, or the Triton grouped-expert kernel.
CUDA_POLICY = ExecutionPolicy(gather_limit=1 << 62, shared_loop=False, row_gather_limit=1 << 22, loop_overhead=None,
                              padded_capacity="batch", graph_few_rows=0.5, loop_rows=None)


def policy_for(device: torch.device) -> ExecutionPolicy:
    """The default execution policy of a device."""
    return CUDA_POLICY if device.type == "cuda" else CPU_POLICY


def set_policy(module: nn.Module, policy: ExecutionPolicy | None, **changes) -> nn.Module:
    """Give every StackedExperts in `module` this execution policy (None: its device's default), with `changes`
    on top of it (e.g. loop_rows=None); returns the module.

    Example:
        >>> set_policy(model, CPU_POLICY, row_gather_limit=0)   # per-input rows: never gather weights per row
    """
    from dataclasses import replace

    for m in module.modules():
        if isinstance(m, StackedExperts):
            base = policy if policy is not None else (policy_for(m.w1.device) if changes else None)
            m.policy = replace(base, **changes) if changes else base
    return module


@functools.cache
def _grouped_graph():
    """StackedExperts.grouped as TorchScript, for ONNX graphs: both execution choices in the graph (an ONNX If on
    the batch's row count), since a graph's batch is only known when it runs. The expert MLP is mlp.float_mlp,
    compiled with it. Scripted on first use."""
    with warnings.catch_warnings():  # torch.jit.script is deprecated; the TorchScript exporter still needs it
        warnings.simplefilter("ignore", DeprecationWarning)

        @torch.jit.script
        def grouped(rows: torch.Tensor, idx: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                    w2: torch.Tensor, b2: Optional[torch.Tensor], kind: str, gather_limit: int, few_rows: int) -> torch.Tensor:
            # rows [R, N, D], idx [R] -> [R, N, D_out]
            R, N, D = rows.shape[0], rows.shape[1], rows.shape[2]
            if R * (w1.shape[1] * w1.shape[2] + w2.shape[1] * w2.shape[2]) < gather_limit or R <= few_rows:
                # each row with its expert's weights gathered: small experts, or so few rows that copying their
                # experts costs less than reading the whole stack (ONNX Runtime has no matmul on a subset in place)
                return float_mlp(kind, rows, w1.index_select(0, idx), None if b1 is None else b1.index_select(0, idx),
                                 w2.index_select(0, idx), None if b2 is None else b2.index_select(0, idx), False)
            # rows grouped into a [E, C*N, D] batch padded to the busiest expert, the stack's weights used in place
            E = w1.shape[0]
            onehot = (idx.unsqueeze(1) == torch.arange(E, device=idx.device)).long()  # [R, E]
            rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # [R]: the row's place among its expert's rows
            C = int(onehot.sum(0).max())
            place = idx * C + rank  # [R]
            x = torch.zeros(E * C, N * D, dtype=rows.dtype, device=rows.device).index_copy(0, place, rows.reshape(R, N * D))
            y = float_mlp(kind, x.reshape(E, C * N, D), w1, b1, w2, b2, False)  # [E, C*N, D_out]
            return y.reshape(E * C, N, y.shape[-1]).index_select(0, place)

    return grouped


class StackedExperts(nn.Module):
    """E experts of one kind with their weights stacked, computed with batched matmuls (no loop over experts).

    Weights: w1 [E, D, H] (GEGLU: [E, D, 2H], value half first, then gate), w2 [E, H, D_out]; biases b1, b2
    when `bias` (None: the kind's default, all but "relu_mlp").
    With quant="int8": w1 and w2 are int8 buffers, with scales w1_scale [E, H1] and w2_scale [E, D_out] (one per
    output channel, w = q * scale) and the biases as float buffers: a quantized stack is inference-only (nothing
    in it is a parameter, and a call that needs gradients through it is refused).
    """

    def __init__(self, kind: ExpertKind, num: int, dim: int, hidden: int, out_dim: int, bias: bool | None = None,
                 quant: str | None = None):
        super().__init__()
        self.kind = kind
        self.quant = quant
        h1 = 2 * hidden if kind == "geglu" else hidden
        has_bias = default_bias(kind) if bias is None else bias
        if quant is not None:
            if quant != "int8":
                raise ConfigError(f"StackedExperts: quant must be None or 'int8', got {quant!r}")
            self.register_buffer("w1", torch.zeros(num, dim, h1, dtype=torch.int8))
            self.register_buffer("w1_scale", torch.ones(num, h1))
            self.register_buffer("w2", torch.zeros(num, hidden, out_dim, dtype=torch.int8))
            self.register_buffer("w2_scale", torch.ones(num, out_dim))
            if has_bias:
                self.register_buffer("b1", torch.zeros(num, h1))
                self.register_buffer("b2", torch.zeros(num, out_dim))
            else:
                self.b1 = self.b2 = None
        else:
            self.w1 = nn.Parameter(torch.empty(num, dim, h1))
            self.w2 = nn.Parameter(torch.empty(num, hidden, out_dim))
            self.w1_scale = self.w2_scale = None
            if has_bias:
                self.b1 = nn.Parameter(torch.zeros(num, h1))
                self.b2 = nn.Parameter(torch.zeros(num, out_dim))
            else:
                self.b1 = self.b2 = None
            # Kaiming-uniform like nn.Linear, per expert.
            nn.init.uniform_(self.w1, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
            nn.init.uniform_(self.w2, -1 / math.sqrt(hidden), 1 / math.sqrt(hidden))
        # None: the Triton grouped-expert kernel for CUDA inference when triton is installed. True/False forces.
        self.use_triton: bool | None = None
        # int8 experts: None quantizes each activation row to int8 (integer matmuls) in an exported graph and keeps
        # float activations in eager torch (exactly the dequantized model); True/False forces one everywhere.
        self.int8_activations: bool | None = None
        # None: the default ExecutionPolicy of the device the weights are on (policy_for); set one to override.
        self.policy: ExecutionPolicy | None = None

    @property
    def weights_per_expert(self) -> int:
        return self.w1[0].numel() + self.w2[0].numel()

    def execution_policy(self) -> ExecutionPolicy:
        return self.policy if self.policy is not None else policy_for(self.w1.device)

    def forward(self, slots: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """slots [K, N, D] -> [K, N, D_out]; expert k of the stack is idx[k] (all experts in order if None)."""
        policy = self.execution_policy()
        if self.quant is not None:
            return self._forward_int8(slots, idx, policy)
        if idx is None:
            training = torch.is_grad_enabled() and (slots.requires_grad or self.w1.requires_grad)
            # the loop writes into `out`: no autograd through it, and no loop in a graph or under torch.compile
            if in_graph() or training or compiling() or policy.loop_rows is None or slots.shape[1] < policy.loop_rows:
                return self._mlp(slots, self.w1, self.b1, self.w2, self.b2)
            out = slots.new_empty(*slots.shape[:-1], self.w2.shape[-1])  # [E, N, D_out], written expert by expert
            for e in range(slots.shape[0]):
                self._expert(slots[e], e, out=out[e])
            return out
        if in_graph() or compiling() or not policy.shared_loop or len(idx) * self.weights_per_expert < policy.gather_limit:
            # Gather the kept experts' weights (an ONNX Gather in a graph), then the same batched matmuls.
            pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
            return self._mlp(slots, pick(self.w1), pick(self.b1), pick(self.w2), pick(self.b2))
        # Large experts, eager: use each kept expert's weights in place (views), one matmul pair per expert;
        # copying them first measured several times slower on a CPU for ViT-sized experts.
        if len(idx) == 0:
            return slots.new_zeros(*slots.shape[:-1], self.w2.shape[-1])
        return torch.stack([self._expert(slots[k], i) for k, i in enumerate(idx.tolist())])

    def grouped(self, rows: torch.Tensor, idx: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
        """Rows that each belong to one expert: rows [R, N, D] -> [R, N, D_out], row r through expert idx[r].

        The per-input path: R = B*K (input, kept expert) pairs, N = S slots each. Each used expert's weights are
        read once (or, for small experts, gathered per row), so the cost is R expert evaluations, not E*B.
        `capacity`: the most rows any one expert can have (B: an input keeps an expert at most once), which lets
        the padded path size its batch without reading the counts back to the host.
        """
        R, N, D = rows.shape
        policy = self.execution_policy()
        if R == 0:
            return rows.new_zeros(0, N, self.w2.shape[-1])
        if self.quant is not None:
            return self._grouped_int8(rows, idx, capacity, policy)
        if torch.jit.is_tracing():
            # The graph chooses at run time, by its batch's row count, with the rule below (an ONNX If).
            return _grouped_graph()(rows, idx, self.w1, self.b1, self.w2, self.b2, self.kind,
                                    policy.row_gather_limit, int(policy.graph_few_rows * self.w1.shape[0]))
        if not in_graph() and self._triton_for(rows):
            from ..kernels.grouped_experts import grouped_experts

            y = grouped_experts(rows.reshape(R * N, D), idx.repeat_interleave(N), self.w1, self.b1, self.w2,
                                self.b2, self.kind)  # [R*N, D_out]
            return y.reshape(R, N, -1)
        if R * self.weights_per_expert < policy.row_gather_limit:
            # Small experts: one batched matmul over the rows, each with its expert's weights gathered.
            pick = lambda t: None if t is None else t.index_select(0, idx)  # noqa: E731
            return self._mlp(rows, pick(self.w1), pick(self.b1), pick(self.w2), pick(self.b2))
        return self._padded_or_loop(rows, idx, capacity, policy, padded=in_graph())

    def _padded(self, rows: torch.Tensor, idx: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
        """Rows grouped by expert into a zero-padded [E, C*N, D] batch (C = the most rows any expert has, or
        `capacity` when given: no host sync), one batched matmul pair over the whole stack (no weight copy), then
        each row read back from its place. The graph function's padded branch computes the same in TorchScript;
        this one keeps eager's fused-bias matmuls (baddbmm), which the committed per-input timings measured."""
        R, N, D = rows.shape
        E = self.w1.shape[0]
        onehot = (idx.unsqueeze(1) == torch.arange(E, device=idx.device)).long()  # [R, E]
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # [R]: the row's place among its expert's rows
        most = capacity if capacity is not None else onehot.sum(0).max()
        width = torch.arange(most, device=idx.device)  # [C]; its length stays dynamic in a graph
        place = idx * width.shape[0] + rank  # [R]
        buf = rows.new_zeros(E * width.shape[0], N * D).index_copy(0, place, rows.reshape(R, N * D))  # [E*C, N*D]
        y = self._mlp(buf.reshape(E, -1, D), *self._weights())  # [E, C*N, D_out]
        return y.reshape(E * width.shape[0], N, -1).index_select(0, place)  # [R, N, D_out]

    def _triton_for(self, rows: torch.Tensor) -> bool:
        if self.quant is not None:
            return False  # the kernel reads float weights
        if self.use_triton is not None:
            return self.use_triton
        if torch.is_grad_enabled() and (rows.requires_grad or self.w1.requires_grad):
            return False  # the kernel has no backward: training runs through torch
        if not (rows.is_cuda and triton_available()):
            return False
        from ..kernels.grouped_experts import grouped_experts_supported

        return grouped_experts_supported(rows, self.w1, self.kind)

    # -- int8 experts -------------------------------------------------------------------------------------------

    def int8_numerics(self) -> bool:
        """Whether this call quantizes activations too (int8 x int8 matmuls): see `int8_activations`."""
        if self.int8_activations is not None:
            return self.int8_activations
        return in_graph() and self.graph_int8()

    def graph_int8(self) -> bool:
        """Whether an exported graph of these int8 experts quantizes activations (large experts, see
        ExecutionPolicy.graph_int8_min) or converts the weights to float (small ones)."""
        return self.weights_per_expert >= self.execution_policy().graph_int8_min

    def _weights(self, idx: torch.Tensor | None = None) -> tuple:
        """(w1, b1, w2, b2, w1_scale, w2_scale) of the stack, or their rows idx; the scales are None for float weights."""
        ts = (self.w1, self.b1, self.w2, self.b2, self.w1_scale, self.w2_scale)
        return ts if idx is None else tuple(None if t is None else t.index_select(0, idx) for t in ts)

    def _refuse_gradients(self, x: torch.Tensor) -> None:
        # A quantized model's parameters are frozen (quantize_, load): inputs that need gradients mean training.
        if torch.is_grad_enabled() and x.requires_grad and not in_graph():
            raise ConfigError("int8 experts are inference-only: no gradients flow through them; heal or train the "
                              "float model, then quantize it (moe-prune compress ... --heal --quantize int8)")

    def _tiles(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Float buffers for one expert's w1 and w2, made once per call and refilled expert by expert: converting
        into fresh memory each time paid page faults that cost more than the matmuls (see dequant_limit)."""
        return x.new_empty(self.w1.shape[1:]), x.new_empty(self.w2.shape[1:])

    def _forward_int8(self, slots: torch.Tensor, idx: torch.Tensor | None, policy: ExecutionPolicy) -> torch.Tensor:
        """`forward` of int8 experts: integer matmuls (int8_numerics), or float activations with the weights
        converted all at once (small stacks, a graph) or expert by expert through reused tiles (large ones)."""
        self._refuse_gradients(slots)
        if idx is not None and len(idx) == 0:
            return slots.new_zeros(*slots.shape[:-1], self.w2.shape[-1])
        if self.int8_numerics():
            if idx is None:  # the layer's own stack: one constant 2-D weight matrix per expert in a graph
                return self._w8a8(slots, self._weights(), per_expert=True)
            return self._w8a8(slots, self._weights(idx))
        E = self.w1.shape[0] if idx is None else len(idx)
        whole = in_graph() or compiling() or E * self.weights_per_expert < policy.dequant_limit
        if whole or (idx is not None and not policy.shared_loop):
            return self._mlp(slots, *self._weights(idx))
        tiles = self._tiles(slots)
        ids = range(E) if idx is None else idx.tolist()
        return torch.stack([self._expert(slots[k], i, tiles=tiles) for k, i in enumerate(ids)])

    def _grouped_int8(self, rows: torch.Tensor, idx: torch.Tensor, capacity: int | None,
                      policy: ExecutionPolicy) -> torch.Tensor:
        """`grouped` of int8 experts: the float paths' choice (weights gathered per row, padded over the stack, a
        loop over the used experts), or with int8_numerics the rows' weights gathered (int8: a quarter of the
        bytes of a float gather) and one batched integer matmul; a graph always takes that path."""
        self._refuse_gradients(rows)
        R, N, D = rows.shape
        if self.int8_numerics():
            return self._w8a8(rows, self._weights(idx))
        if in_graph() or R * self.weights_per_expert < policy.row_gather_limit:
            return self._mlp(rows, *self._weights(idx))
        return self._padded_or_loop(rows, idx, capacity, policy, tiled=True)

    def _padded_or_loop(self, rows: torch.Tensor, idx: torch.Tensor, capacity: int | None, policy: ExecutionPolicy,
                        padded: bool = False, tiled: bool = False) -> torch.Tensor:
        """rows [R, N, D] grouped by expert idx [R]: padded over the stack (always, with `padded`: in a graph), or,
        when few experts are used, one matmul pair per used expert on its rows (weights as views; int8 ones
        converted into reused tiles with `tiled`)."""
        R, N, D = rows.shape
        sync_free = policy.padded_capacity == "batch" and capacity is not None
        if padded or compiling() or policy.loop_overhead is None:
            return self._padded(rows, idx, capacity if sync_free or compiling() else None)
        used, counts = torch.unique(idx, return_counts=True)  # [U], ascending
        E = self.w1.shape[0]
        if len(used) * (self.weights_per_expert + policy.loop_overhead) >= E * self.weights_per_expert:
            return self._padded(rows, idx, capacity if sync_free else None)
        order = torch.argsort(idx, stable=True)  # rows grouped by expert
        groups = rows.index_select(0, order).split(counts.tolist())
        kw = {"tiles": self._tiles(rows)} if tiled else {}
        y = torch.cat([self._expert(g.reshape(-1, D), e, **kw).reshape(len(g), N, -1)
                       for g, e in zip(groups, used.tolist())])  # [R, N, D_out], grouped order
        return torch.empty_like(y).index_copy_(0, order, y)

    def _w8a8(self, x: torch.Tensor, weights: tuple, per_expert: bool = False) -> torch.Tensor:
        """x [K, N, D] through int8 weights (w1, b1, w2, b2, w1_scale, w2_scale) [K, ...], activations quantized
        per row before each matmul; [K, N, D_out] in x's dtype."""
        w1, b1, w2, b2, s1, s2 = weights
        h = expert_activation(self.kind, w8a8_linear(x, w1, s1, b1, per_expert))  # [K, N, H] float32
        return w8a8_linear(h, w2, s2, b2, per_expert).to(x.dtype)

    def _expert(self, x: torch.Tensor, i: int, out: torch.Tensor | None = None, tiles=None) -> torch.Tensor:
        """x [N, D] through expert i of the stack, its weights used in place (the result into `out` if given).
        int8 weights are converted into `tiles` (see _tiles) when given."""
        at = lambda t: None if t is None else t[i]  # noqa: E731
        if self.quant is not None:
            w1, w2 = (self.w1[i], self.w2[i]) if tiles is None else (tiles[0].copy_(self.w1[i]), tiles[1].copy_(self.w2[i]))
            h = expert_activation(self.kind, linear(x, w1, at(self.b1), self.w1_scale[i]))  # [N, H]
            y = linear(h, w2, at(self.b2), self.w2_scale[i])  # [N, D_out]
            return y if out is None else out.copy_(y)
        if out is None:
            return self._mlp(x, self.w1[i], at(self.b1), self.w2[i], at(self.b2))
        h = expert_activation(self.kind, linear(x, self.w1[i], at(self.b1)))  # [N, H]
        if self.b2 is None:
            return torch.mm(h, self.w2[i], out=out)
        return torch.addmm(self.b2[i], h, self.w2[i], out=out)

    def _mlp(self, x, w1, b1, w2, b2, s1=None, s2=None):
        """x [..., N, D] through this stack's kind of expert (see mlp.expert_mlp)."""
        return expert_mlp(self.kind, x, w1, b1, w2, b2, s1, s2)
