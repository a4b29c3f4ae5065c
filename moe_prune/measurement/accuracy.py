"""Accuracy of a classifier on a labelled test set, one batch in memory at a time: top-1, top-5 and per class,
predictions, and a check that the labels fit the model's head. It imports nothing from compression or export:
compression reports accuracy before and after healing through here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.devices import device_of


def as_examples(model: nn.Module, images, labels=None):
    """A test set as datasets.Examples: Examples or Batches as they are; arrays (uint8 images through the model's
    preprocessing, float inputs as they are) with their labels."""
    import numpy as np

    from ..data.examples import ArrayExamples, Batches, Examples
    from ..core.preprocess import Preprocess, for_model

    if isinstance(images, Batches):
        return images.examples
    if isinstance(images, Examples):
        return images
    arr = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    pre = None
    if arr.dtype == np.uint8:
        pre = for_model(model) or Preprocess(size=arr.shape[-2:], channels=1, crop_pct=1.0, interpolation="bilinear")
    y = None if labels is None else (labels.numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels))
    return ArrayExamples(arr, y, pre)


@torch.no_grad()
def measure(model: nn.Module, images, labels=None, batch_size: int = 256) -> dict:
    """Top-1 and top-5 accuracy and per-class accuracy of a classifier, one batch in memory at a time.

    Args:
        model: a classifier. images: datasets.Examples or Batches (with labels), or an array of inputs with
            `labels`. batch_size: the batch size (Algorithm 2's choices depend on it).

    Returns:
        {"top1", "top5" (top-k of min(5, classes)), "per_class" (accuracy of each label 0..C-1 present, None for
        an absent one), "n"}.

    Example:
        >>> measure(model, open_data("photos/", "test", for_model(model), labelled=True))["top5"]
    """
    from ..data.examples import Batches

    examples = as_examples(model, images, labels)
    if examples.labels is None:
        from ..errors import DataError

        raise DataError(f"{examples.where}: no labels to measure accuracy with")
    was_training = model.training
    model.eval()
    top1 = top5 = n = 0
    hits = torch.zeros(0, dtype=torch.long)
    counts = torch.zeros(0, dtype=torch.long)
    for x, y in Batches(examples, batch_size, device=device_of(model)).labelled():
        logits = model(x).float().cpu()  # counted on the host: one [b, classes] copy per batch
        y = y.cpu()
        k = min(5, logits.shape[-1])
        right = logits.argmax(-1) == y  # argmax: ties go to the lower class, as they always have here
        best = logits.topk(k, dim=-1).indices  # [b, k]; its order among ties is torch's
        top1 += int(right.sum())
        top5 += int(((best == y[:, None]).any(-1) | right).sum())
        n += len(y)
        size = max(len(counts), int(y.max()) + 1, logits.shape[-1])
        hits = torch.cat([hits, torch.zeros(size - len(hits), dtype=torch.long)])
        counts = torch.cat([counts, torch.zeros(size - len(counts), dtype=torch.long)])
        hits.index_add_(0, y, right.long())
        counts.index_add_(0, y, torch.ones_like(y))
    model.train(was_training)
    per_class = [None if c == 0 else h / c for h, c in zip(hits.tolist(), counts.tolist())]
    return {"top1": top1 / max(n, 1), "top5": top5 / max(n, 1), "per_class": per_class, "n": n}


@torch.no_grad()
def predict(model: nn.Module, images, batch_size: int = 256) -> torch.Tensor:
    """Class predictions [N] for images (uint8 images through the model's preprocessing, float model inputs, or
    datasets.Examples)."""
    from ..data.examples import Batches

    was_training = model.training
    model.eval()
    preds = [model(x).argmax(-1).cpu() for x, _ in
             Batches(as_examples(model, images), batch_size, device=device_of(model)).labelled()]
    model.train(was_training)
    return torch.cat(preds)


def check_labels(model: nn.Module, images, labels=None, where: str = "the data") -> None:
    """Raise DataError when the labels do not fit the classifier's outputs (e.g. 10 classes, a 5-class head)."""
    import numpy as np

    from ..errors import DataError

    examples = as_examples(model, images, labels)
    x, _ = examples.batch(np.arange(1))
    with torch.no_grad():
        classes = model.eval()(x.to(device_of(model))).shape[-1]
    top = int(np.max(examples.labels))
    if top >= classes:
        names = f" ({len(examples.classes)} class folders)" if examples.classes else ""
        raise DataError(f"{where}: labels go up to {top}{names}, but the model has {classes} classes; evaluate it on "
                        "data with its own classes (a classes.txt in the folder maps folder names to the model's classes)")


def accuracy(model: nn.Module, images, labels=None, batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier (see `measure`).

    Example:
        >>> accuracy(model, *load_images("sample", split="test"))
        0.871
    """
    return measure(model, images, labels, batch_size)["top1"]
