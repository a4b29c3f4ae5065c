"""onnx: the model as an ONNX file, proved to compute what PyTorch computes. Export + validate.

export.py: `export_onnx` (static subsets, Algorithm 2 or Algorithm 1 inside the graph; the preprocessing inside
if asked; TorchScript or dynamo exporter). validate.py: ONNX Runtime against PyTorch on random batches of each
batch size, the graph's operators and the recorded preprocessing checked, as a checklist. export_file.py:
`moe-prune export`, a checkpoint to a validated file, published only when validation passes. files.py: writing and
reading ONNX files (external data, metadata, the preprocessing record). stage.py: `export(model, path,
ExportConfig)`, the stage as one verb: written, then validated.

May import: moe_prune.errors, core, data, selection and compression (the int8 numerics). Nothing here imports
measurement, serving, flows or cli.
"""
