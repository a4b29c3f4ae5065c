"""Whether inputs fit a model, said before anything runs: the shape, dtype and value range the model takes
(core.preprocess.model_input) against what a file or data source holds, in one line naming the source.
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.preprocess import as_nhwc, describe_input, model_input
from ..errors import DataError
from .examples import ArrayExamples


def check_examples(model, examples, src) -> None:
    """`check_inputs` for a data source: float arrays are checked as they are; images are preprocessed into the
    model's input shape, so only a model that takes tokens can refuse them."""
    want = model_input(model)
    if isinstance(examples, ArrayExamples) and examples.array.dtype != np.uint8:
        check_inputs(model, examples.array, src)
    elif want["kind"] == "tokens":
        raise DataError(f"{src}: images, but the model takes {describe_input(want)}")
    elif isinstance(examples, ArrayExamples):
        try:
            as_nhwc(examples.array[:1])
        except DataError:
            raise DataError(f"{src}: inputs are uint8 {list(examples.array.shape)}, but the model takes "
                            f"{describe_input(want)}; save images as [N, H, W], [N, H, W, C] or [N, C, H, W]") from None


def check_inputs(model, inputs, src) -> None:
    """Refuse inputs the model cannot take, in one line naming `src`, the shape found and the shape it takes.

    uint8 [N, H, W] / [N, 1, H, W] images count as [N, 1, H, W] in [0, 1] (see `to_tensor`). Float images
    outside the model's input range (0-255 pixels given to a model trained on [0, 1]) are refused; where the
    range is not known (a converted checkpoint) values that look like 0-255 pixels get a warning on stderr.

    Raises:
        DataError: wrong rank, channels, size or token width; or float pixels outside the model's range.

    Example:
        >>> check_inputs(model, np.zeros((4, 32, 32), np.uint8), "calib.npy")  # DataError: ... takes [N, 1, 28, 28]
    """
    import sys

    want = model_input(model)
    t = torch.as_tensor(inputs) if not isinstance(inputs, torch.Tensor) else inputs
    found = f"{str(t.dtype).replace('torch.', '')} {list(t.shape)}"
    shape = list(t.shape)
    if want["kind"] == "images" and t.dtype == torch.uint8 and t.ndim == 3:
        shape = [shape[0], 1, *shape[1:]]
    takes = describe_input(want)
    if want["kind"] == "tokens":
        ok = len(shape) == 3 and shape[2] == want["shape"][1]
        hint = "save float32 tokens [N, M, D] with np.save (a bare layer takes no images)"
    else:
        ok = len(shape) == 4 and shape[1:] == want["shape"]
        hint = ("add the channel axis (x[:, None])" if len(shape) == 3 and [1, *shape[1:]] == want["shape"]
                else "resize or reshape the inputs to that shape")
    if not ok:
        raise DataError(f"{src}: inputs are {found}, but the model takes {takes}; {hint}")
    if want["kind"] != "images" or t.dtype == torch.uint8 or t.numel() == 0:
        return
    lo, hi = float(t.min()), float(t.max())
    rng = want.get("range")
    if rng is not None and (lo < rng[0] - 1e-3 or hi > rng[1] + 1e-3):
        raise DataError(
            f"{src}: float pixels span [{lo:g}, {hi:g}], but the model takes [{rng[0]:g}, {rng[1]:g}] "
            f"(pixels / 255); divide the inputs by 255, or save them as uint8 images"
        )
    if rng is None and hi > 10:
        print(f"moe-prune: warning: {src}: float pixels go up to {hi:g}; if they are 0-255 values, normalize "
              "them as the model was trained", file=sys.stderr)
