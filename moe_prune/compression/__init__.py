"""compression: a smaller model, made to work as well as it can. Compress (+ heal by distillation, + quantize).

compress.py: checkpoints and models that hold only the kept experts (reading only their rows from a file), the
static subsets chosen from calibration data on the way (`compress_from_data`, what `moe-prune compress` runs), and
the record written into the output's metadata. healing.py: distillation of the compressed model from the full
one, stopped when held-out loss stops improving. quantize.py: int8 expert weights with one scale per output
channel, last. stage.py: `compress(model, calib, CompressConfig)`, the stage as one verb (choose, cut, heal,
quantize), returning the model and its record.

May import: moe_prune.errors, core, data, selection, and measurement.accuracy (compress_and_heal reports accuracy
before and after healing; accuracy.py imports nothing from here). Nothing here imports onnx, the rest of
measurement, serving, flows or cli.
"""
