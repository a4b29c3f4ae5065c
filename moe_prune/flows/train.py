"""Training, to have real Soft MoE checkpoints here: Chung et al.'s setup (Adam, lr 1e-3, batch 256, 15 epochs).

After every epoch the run state (weights, Adam moments, epoch) is written atomically to `OUT.resume`, so a run
that is killed resumes from its last completed epoch; the final checkpoint records its test accuracy, the
history and the command in its metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.checkpoint import save
from ..errors import ConfigError
from ..measurement.accuracy import accuracy
from ..core.files import atomic_output
from ..core.models import model_spec


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and schedule.

    Example:
        >>> TrainConfig(epochs=1, batch_size=128)
    """

    epochs: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    validation: int = 0  # the last N training images held out: the validation split (see `validation_split`)

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0 or self.validation < 0:
            raise ConfigError(f"train config: epochs and batch_size must be >= 1, lr > 0, weight_decay >= 0, "
                              f"validation >= 0; got {self}")


def init_router_scale(model: nn.Module, value: float) -> None:
    """Set every Soft MoE layer's learned router scale (soft-moe and vmoe start it at 1).

    The scale is the inverse temperature of both softmaxes over l2-normalized logits in [-1, 1]: at 1, routing
    starts nearly uniform and, in short trainings, stays so.

    Example:
        >>> init_router_scale(model, 10.0)
    """
    from ..core.models import moe_layers

    if not value > 0:
        raise ConfigError(f"router scale init must be positive, got {value}")
    with torch.no_grad():
        for layer in moe_layers(model).values():
            if layer.scale is None:
                raise ConfigError("this model's Soft MoE layers have no learned scale (phi_norm=False)")
            layer.scale.fill_(value)


def _fingerprint(model: nn.Module, config: TrainConfig, n_train: int) -> str:
    blob = json.dumps({"spec": model_spec(model), "train": asdict(config), "n": n_train}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _save_resume(path: Path, model, opt, epoch: int, history: list, fingerprint: str) -> None:
    state = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    steps = {}
    for group in opt.param_groups:
        for p in group["params"]:
            s = opt.state.get(p)
            if s:
                state[f"adam.exp_avg.{names[id(p)]}"] = s["exp_avg"].cpu().contiguous()
                state[f"adam.exp_avg_sq.{names[id(p)]}"] = s["exp_avg_sq"].cpu().contiguous()
                steps[names[id(p)]] = float(s["step"])
    meta = {"epoch": str(epoch), "history": json.dumps(history), "steps": json.dumps(steps), "fingerprint": fingerprint}
    with atomic_output(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata=meta)


def _load_resume(path: Path, model, opt, fingerprint: str) -> tuple[int, list]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    if meta.get("fingerprint") != fingerprint:
        raise ConfigError(f"{path}: a resume file from a different run (model, data or settings differ); delete it to start over")
    state = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("model.")})
    steps = json.loads(meta["steps"])
    params = dict(model.named_parameters())
    for name, step in steps.items():
        dev = params[name].device  # the moments live beside their parameter
        opt.state[params[name]] = {
            "step": torch.tensor(step), "exp_avg": state[f"adam.exp_avg.{name}"].to(dev),
            "exp_avg_sq": state[f"adam.exp_avg_sq.{name}"].to(dev),
        }
    return int(meta["epoch"]), json.loads(meta["history"])


def train(
    model: nn.Module,
    train_set: tuple,
    test_set: tuple,
    config: TrainConfig = TrainConfig(),
    out: str | os.PathLike | None = None,
    progress: bool = True,
    meta: dict | None = None,
    device=None,
    val_set: tuple | None = None,
) -> dict:
    """Train a classifier with Adam and cross-entropy; watch the accuracy after every epoch on `val_set` (then the
    test set is read once, at the end) or, without one, on the test set (nothing is chosen on it: fixed epochs).

    Args:
        model: a moe-prune model (its parameters are trained in place).
        train_set, test_set: (images uint8 [N, 28, 28] or float [N, C, H, W], labels [N]).
        config: optimizer and schedule.
        out: the checkpoint to write at the end; `out + ".resume"` holds the state after each epoch, and an
            existing one from the same run is resumed.
        progress: show progress bars with loss and accuracy.
        meta: extra metadata for the checkpoint.
        device: where to train ("auto": a GPU when torch sees one; None: where the model is).
        val_set: the validation split (images, labels), watched every epoch in place of the test set.

    Returns:
        {"test_accuracy": float, "history": [{"epoch", "loss", "train_accuracy", "val_accuracy" (with val_set) or
        "test_accuracy", "seconds"}]}.

    Example:
        >>> model = MnistSoftMoE(MnistConfig(num_experts=16))
        >>> train(model, load_images("fashion-mnist", "train"), load_images("fashion-mnist", "test"), out="m.safetensors")
    """
    from ..data.mnist import iterate_batches
    from ..core.progress import progress as progress_bar

    torch.manual_seed(config.seed)
    if device is not None:
        from ..core.devices import resolve_device

        model.to(resolve_device(device))
    dev = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    fingerprint = _fingerprint(model, config, len(train_set[0]))
    resume = Path(f"{out}.resume") if out is not None else None
    start, history = 0, []
    if resume is not None and resume.exists():
        start, history = _load_resume(resume, model, opt, fingerprint)
        print(f"resuming {out} after epoch {start}", file=sys.stderr)
    # Two bars on a terminal: the epochs (with the time left for the whole run) and the batches of this one.
    epochs = progress_bar(enabled=progress, total=config.epochs, initial=start, desc="epochs", unit="epoch", position=0)
    for epoch in range(start, config.epochs):
        model.train()
        t0, total, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        batches = iterate_batches(*train_set, config.batch_size, shuffle=True, seed=config.seed * 1000 + epoch)
        steps = -(-len(train_set[0]) // config.batch_size)
        bar = progress_bar(batches, enabled=progress, total=steps, desc=f"epoch {epoch + 1}/{config.epochs}", position=1)
        for x, y in bar:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += len(y)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(-1) == y).sum().item()
            bar.set_postfix(loss=f"{loss_sum / total:.4f}", acc=f"{correct / total:.4f}")
        # With a validation split, each epoch is watched there and the test set is read once, at the end.
        watched = "val_accuracy" if val_set is not None else "test_accuracy"
        acc_now = accuracy(model, *(val_set if val_set is not None else test_set))
        history.append({
            "epoch": epoch + 1, "loss": loss_sum / total, "train_accuracy": correct / total,
            watched: acc_now, "seconds": time.perf_counter() - t0,
        })
        bar.close()
        epochs.update()
        if progress:
            h = history[-1]
            epochs.write(f"epoch {epoch + 1}/{config.epochs}: loss {h['loss']:.4f}, train acc {h['train_accuracy']:.4f}, "
                         f"{watched.split('_')[0]} acc {acc_now:.4f} ({h['seconds']:.0f} s)", file=sys.stderr)
        if resume is not None and epoch + 1 < config.epochs:
            _save_resume(resume, model, opt, epoch + 1, history, fingerprint)
    epochs.close()
    model.eval()
    test_acc = history[-1]["test_accuracy"] if val_set is None else accuracy(model, *test_set)
    result = {"test_accuracy": test_acc, "history": history}
    if out is not None:
        from ..core.preprocess import for_model

        pre = for_model(model)  # what the training images were: pixels / 255 at 28x28
        save(model, out, meta={**(meta or {}), **result, "train_config": asdict(config),
                               **({"preprocess": pre.to_dict()} if pre is not None else {})})
        if resume is not None:
            resume.unlink(missing_ok=True)
    return result


def train_models(family: str, experts, data: str = "fashion-mnist", out_dir: str | os.PathLike = "runs", *,
                 vit: dict | None = None, scale_init: float = 1.0, config: TrainConfig = TrainConfig(),
                 meta: dict | None = None, device=None):
    """Train one model per expert count (the `moe-prune train` command): OUT_DIR/{family}-e{n}[-s{scale}].safetensors.

    Each model starts from the same seed (`config.seed`); OUT_DIR is kept on failure, as it holds the `.resume`
    files of finished epochs.

    Args:
        family: "mnist" (Chung et al.'s model, experts of width 784/n) or "vit" (the Soft MoE ViT).
        experts: the expert counts, one model each.
        data: the data set name or IDX folder (its train and test splits).
        out_dir: the folder the checkpoints go to (created if missing).
        vit: with "vit", the ViTConfig arguments (the expert count is set per model).
        scale_init: the initial router scale of every Soft MoE layer (see `init_router_scale`).
        config: optimizer and schedule.
        meta: extra metadata for every checkpoint (the router scale is added).
        device: where to train (see `train`).

    Returns:
        An iterator of (checkpoint path, `train`'s result), one per expert count, as each model finishes.

    Raises:
        DataError: see `load_images`. ConfigError: a bad scale or ViT config.

    Example:
        >>> for path, r in train_models("mnist", [8, 16], "fashion-mnist", "runs"):
        ...     print(path, r["test_accuracy"])
    """
    from ..data.mnist import load_images
    from ..core.models import MnistConfig, MnistSoftMoE, SoftMoEViT, ViTConfig

    train_set = load_images(data, split="train")
    test_set = load_images(data, split="test")
    val_set = None
    if config.validation:  # held out: never trained on; later choices are made on it (README, Results)
        if config.validation >= len(train_set[0]):
            raise ConfigError(f"--validation {config.validation}: the training split has only {len(train_set[0])} images")
        val_set = (train_set[0][-config.validation:], train_set[1][-config.validation:])
        train_set = (train_set[0][:-config.validation], train_set[1][:-config.validation])
        meta = {**(meta or {}), "validation": {"split": "train", "first": len(train_set[0]), "count": config.validation}}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # kept on failure: it holds the .resume files of finished epochs
    for n in experts:
        torch.manual_seed(config.seed)
        if family == "mnist":
            model = MnistSoftMoE(MnistConfig(num_experts=n))
        else:
            model = SoftMoEViT(ViTConfig(**{**(vit or {}), "num_experts": n}))
        init_router_scale(model, scale_init)
        suffix = "" if scale_init == 1.0 else f"-s{scale_init:g}"
        out = out_dir / f"{family}-e{n}{suffix}.safetensors"
        print(f"training {out} ({sum(p.numel() for p in model.parameters()):,} parameters)", file=sys.stderr)
        yield out, train(model, train_set, test_set, config, out=out,
                         meta={**(meta or {}), "router_scale_init": scale_init}, device=device, val_set=val_set)
