"""serving: the reduced model in production. Serve: Triton Inference Server without torch, a Triton repository, a
predictor.

server.py: `moe-prune serve`, an ONNX file behind Triton's HTTP and gRPC APIs through PyTriton (no torch, no
triton). predictor.py: an ONNX Runtime predictor fed through the model's own preprocessing (no torch).
repository.py: a Triton model repository (config.pbtxt and the exported model; exporting imports torch when
called).

May import: moe_prune.errors, core (preprocess.py, which imports no torch) and onnx (the files' metadata; the
repository writer's export). The server and predictor import torch nowhere.
"""
