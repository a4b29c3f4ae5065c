"""core: what a Soft MoE model is, and how it is stored. Load -> route -> execute.

The Soft MoE layer (layers.py) with its routing math (routing.py: tokens, logits, dispatch and combine weights,
`Routing`), its stacked experts (experts.py, execution policy per device) and their MLP math (mlp.py: activation,
float and int8 linears, `expert_mlp`); a layer cut down to the experts it keeps (subsets.py); the model families
and their specs (models/); the native checkpoint format and every library file opened as if it were native
(checkpoint.py, formats.py, libraries.py, library_files.py, weights.py, summary.py); `convert(model)` for the
libraries' layers inside a user's model (convert.py); the model's own preprocessing and what it takes as input
(preprocess.py, which imports no torch); its cost in FLOPs and bytes (flops.py); files written atomically
(files.py), devices, tracing context and progress bars.

May import: moe_prune.errors and moe_prune.version, and the Triton kernels (moe_prune.kernels) only inside the
functions that launch them on CUDA tensors; the kernels import core's torch references (routing.py, mlp.py), never
the other way at module level. Nothing in core imports data, selection, compression, onnx, measurement, serving,
flows or cli.
"""
