"""data: the user's inputs, read a batch at a time. Data -> (select, compress, measure).

Data sources opened by name (sources.py: image folders, image lists, .npy/.npz arrays, the IDX data sets, the
bundled sample) as Examples, read as Batches through the model's own preprocessing (examples.py); the arrays
(arrays.py), the Fashion-MNIST and MNIST IDX files (mnist.py, idx.py); checks that inputs fit a model before
anything runs (inputs.py); and, under torchrun, which batches this process reads and the sums over processes
(shards.py: the one shard/all-reduce helper of calibration, the selection rules and healing).

May import: moe_prune.errors and moe_prune.core (for the model's preprocessing and input description). Nothing
here imports selection, compression, onnx, measurement, serving, flows or cli.
"""
