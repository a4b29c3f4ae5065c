"""Recovery by distillation: train a compressed model to match the full model's outputs on unlabeled inputs.

    loss = T^2 * KL(softmax(teacher / T) || softmax(student / T))     (classifiers: logits, temperature T)
    loss = |student - teacher|^2 / |teacher|^2, over the batch         (a bare Soft MoE layer: its output tokens)

Only what compression kept is trained: the kept experts' weights of every Soft MoE layer (`parts="experts"`),
also the routers (phi, scale, token gain: "experts+router"), and also the classifier head (`head.*`,
"experts+router+head", the default). Everything else is frozen (attention, patch embedding, norms), and a
dropped expert does not exist in the compressed model. Adam; mini-batches drawn from the calibration inputs
by a seeded generator, so a run is deterministic for its seed (on one device and thread count). A classifier
teacher runs once over the inputs and its logits are kept ([N, classes]); a bare layer's teacher runs beside the
student batch by batch. Memory: the inputs, plus one batch of training.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.devices import device_of
from ..core.layers import SoftMoE
from ..core.models import moe_layers
from ..data.shards import all_reduce, shard, sum_over_ranks
from ..errors import ConfigError

PARTS = ("experts", "experts+router", "experts+router+head")
ROUTER_TENSORS = ("phi", "scale", "norm_weight")


@dataclass(frozen=True)
class HealConfig:
    """Distillation settings (`moe-prune compress --heal`).

    Args:
        steps: Adam steps. batch_size: inputs per step. lr: Adam learning rate.
        temperature: the softmax temperature of the KL divergence (classifiers only).
        parts: "experts" (the kept experts' weights), "experts+router" (also phi, scale and token gain) or
            "experts+router+head" (also the classifier head; the default: it measured best, see the README).
        seed: the mini-batch order.
        held_out: the share of the inputs set aside (spread evenly over them) and never trained on: their distillation
            loss is measured before healing and every tenth of the steps, and the weights of the best
            measurement are kept, so healing never leaves the model worse on them than it found it. 0: none
            (with fewer than 10 inputs there is none either).
        max_epochs: at most this many passes over the training inputs, whatever `steps` says (healing sized to
            the data: 2,000 calibration inputs get 282 steps of 128, not 3,000). 0: no cap.
        patience: stop once this many held-out measurements in a row did not improve on the best (0: never stop
            early). Without a held-out slice there is nothing to stop on.
        nothing_below: skip healing when the held-out loss before it is already below this (the compressed model
            already answers as the full one does there).

    Example:
        >>> HealConfig(steps=200, lr=5e-4)
    """

    steps: int = 3000
    batch_size: int = 128
    lr: float = 1e-2
    temperature: float = 2.0
    parts: str = "experts+router+head"
    seed: int = 0
    held_out: float = 0.1
    max_epochs: float = 20.0
    patience: int = 3
    nothing_below: float = 1e-6

    def __post_init__(self):
        for name, flag, value in (("steps", "--heal-steps", self.steps), ("batch_size", "batch size", self.batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"heal: {name} ({flag}) must be an integer >= 1, got {value!r}")
        for name, flag, value in (("lr", "--heal-lr", self.lr), ("temperature", "--heal-temperature", self.temperature)):
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"heal: {name} ({flag}) must be positive and finite, got {value!r}")
        if self.parts not in PARTS:
            raise ConfigError(f"heal: parts={self.parts!r}; choose one of {', '.join(PARTS)}")
        if not (isinstance(self.held_out, (int, float)) and 0 <= self.held_out < 1):
            raise ConfigError(f"heal: held_out={self.held_out!r}; give a share in [0, 1)")
        if not (isinstance(self.max_epochs, (int, float)) and self.max_epochs >= 0):
            raise ConfigError(f"heal: max_epochs={self.max_epochs!r}; give 0 (no cap) or more")
        if not (isinstance(self.patience, int) and self.patience >= 0):
            raise ConfigError(f"heal: patience={self.patience!r}; give 0 (never stop early) or more")
        if not (isinstance(self.nothing_below, (int, float)) and self.nothing_below >= 0):
            raise ConfigError(f"heal: nothing_below={self.nothing_below!r}; give 0 or more")

    def to_dict(self) -> dict:
        return asdict(self)


def trainable(model: nn.Module, parts: str = "experts+router+head") -> dict[str, nn.Parameter]:
    """The parameters `heal` trains, by name: every Soft MoE layer's expert stack, with "experts+router" also its
    router (phi, scale, token gain), with "experts+router+head" also the classifier head (not for a bare layer).

    Example:
        >>> sorted(trainable(small))
        ['moe.experts.w1', 'moe.experts.w2']
    """
    if parts not in PARTS:
        raise ConfigError(f"heal: parts={parts!r}; choose one of {', '.join(PARTS)}")
    out = {}
    for name, layer in moe_layers(model).items():
        prefix = f"{name}." if name else ""
        for pname, p in layer.named_parameters():
            if pname.startswith("experts.") or (parts != "experts" and pname in ROUTER_TENSORS):
                out[prefix + pname] = p
    if parts == "experts+router+head" and not isinstance(model, SoftMoE):
        out.update({n: p for n, p in model.named_parameters() if n.startswith("head.")})
    return out


def _loss(student_out: torch.Tensor, teacher_out: torch.Tensor, temperature: float, bare: bool) -> torch.Tensor:
    if bare:
        return (student_out - teacher_out).pow(2).sum() / teacher_out.pow(2).sum().clamp_min(1e-30)
    t = temperature
    return F.kl_div(F.log_softmax(student_out / t, -1), F.log_softmax(teacher_out / t, -1), log_target=True,
                    reduction="batchmean") * t * t


def _stream(inputs, batch_size: int, model: nn.Module):
    """The inputs (a tensor, a list of batches, datasets.Batches or Examples) in order, batch_size at a time, on
    the model's device."""
    from ..data.examples import Batches, Examples, as_batches

    examples = inputs if isinstance(inputs, Examples) else as_batches(inputs).examples
    return Batches(examples, batch_size, device=device_of(model))


@torch.no_grad()
def distillation_loss(student: nn.Module, teacher: nn.Module, inputs, temperature: float = 2.0,
                      batch_size: int = 256, targets: torch.Tensor | None = None) -> float:
    """The distillation loss of `student` against `teacher` over all `inputs` (mean over inputs).

    `inputs`: a tensor [N, ...], a list of batches, or datasets.Batches / Examples (read a batch at a time).
    `targets`: the teacher's outputs on `inputs`, if already computed (then the teacher is not run).

    Example:
        >>> distillation_loss(small, full, images[:1000])
    """
    bare = isinstance(teacher, SoftMoE)
    rank, world = shard()
    stream = _stream(inputs, batch_size, student)
    total, n, start = 0.0, 0, 0
    for i in range(len(stream)):  # under torchrun each rank its own batches, the sums added up
        if i % world != rank:
            start += len(stream._idx(i))
            continue
        x = stream[i]
        t = targets[start:start + len(x)] if targets is not None else teacher(x)
        total += float(_loss(student(x), t, temperature, bare)) * len(x)  # a bare layer: per-batch relative error
        n += len(x)
        start += len(x)
    total, n = sum_over_ranks(total, n)
    return total / max(n, 1)


@torch.no_grad()
def _teacher_logits(teacher: nn.Module, inputs, batch_size: int = 256) -> torch.Tensor | None:
    """A classifier's logits on every input, computed once ([N, classes]: small); None for a bare layer, whose
    outputs are as large as its inputs and are computed batch by batch instead."""
    if isinstance(teacher, SoftMoE):
        return None
    rank, world = shard()
    stream = _stream(inputs, batch_size, teacher)
    if world == 1:
        return torch.cat([teacher(x) for x in stream])
    parts = {}  # under torchrun: each rank its own batches, then every rank gets them all (N x classes: small)
    for i in range(rank, len(stream), world):
        parts[i] = teacher(stream[i])
    width = teacher(stream.rows(np.arange(1))).shape[-1]  # a rank may have no batch of its own
    full = torch.zeros(stream.num_inputs, width, dtype=torch.float64)
    for i, logits in parts.items():
        idx = stream._idx(i)
        full[idx[0]:idx[-1] + 1] = logits.double().cpu()
    return all_reduce({"logits": full})["logits"].to(device=device_of(teacher), dtype=torch.float32)


def _share(x: torch.Tensor, target: torch.Tensor, batch: int, bare: bool, world: int) -> float | torch.Tensor:
    """What this rank's loss on its share of a batch weighs in the whole batch's loss (1.0 in one process).

    Distillation (a mean over inputs): its share of the inputs. A bare layer's relative error divides by the
    whole batch's |target|^2: its own, over the sum of all ranks'."""
    if world == 1:
        return 1.0
    if not bare:
        return len(x) / batch
    import torch.distributed as dist

    own = target.detach().double().pow(2).sum()
    total = own.clone()
    dist.all_reduce(total)
    return (own / total).to(target.dtype)


def _all_reduce_grads(params) -> None:
    """Sum every trained tensor's gradient over the ranks: each holds its share of the batch's loss."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def heal(student: nn.Module, teacher: nn.Module, inputs, config: HealConfig = HealConfig(),
         progress: bool = True) -> dict:
    """Distill `teacher` (the full model) into `student` (its compressed model) in place, on unlabeled inputs.

    Args:
        student: the compressed model (or bare layer); its kept experts (see `trainable`) are trained in place.
        teacher: the full model it was compressed from (never modified).
        inputs: the calibration inputs: a tensor [N, ...], a list of batches, or datasets.Batches (an image folder,
            decoded per step unless it fits its cache budget: memory stays one batch plus N x classes logits).
        config: see HealConfig.
        progress: a progress bar with the running loss.

    Returns:
        {"loss_before", "loss_after" (over all inputs), "trained" (tensor names), "seconds", "history"
        (the running loss every 10% of the steps), "config"}.

    Raises:
        ConfigError: bad settings, or a student with nothing to train.

    Example:
        >>> small = compress_model(full, subsets)
        >>> heal(small, full, calibration_images, HealConfig(steps=500))["loss_after"]
    """
    from ..core.progress import progress as progress_bar
    from ..data.examples import as_batches

    # The inputs are read a batch at a time (an image folder is decoded per step unless it fit the cache budget);
    # only the teacher's logits, N x classes, are kept for the whole set.
    data = as_batches(inputs, device=device_of(teacher))
    x_all = data.examples
    if len(x_all) == 0:
        raise ConfigError("heal: no calibration inputs")
    params = trainable(student, config.parts)
    if not params:
        raise ConfigError("heal: the model has no Soft MoE expert weights to train")
    teacher_params = list(teacher.parameters())
    shared = any(p is q or (p.data_ptr() != 0 and p.data_ptr() == q.data_ptr())
                 for p in params.values() for q in teacher_params)
    if shared:
        raise ConfigError("heal: the student shares trained tensors with the teacher (make it with compress_model)")
    bare = isinstance(teacher, SoftMoE)
    keep = {id(p) for p in params.values()}
    frozen = [p for p in student.parameters() if id(p) not in keep]
    was = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    teacher.eval()
    student.eval()  # no dropout or batch statistics in these models; eval mode keeps inference numerics
    t0 = time.perf_counter()
    rank, world = shard()
    cached = _teacher_logits(teacher, x_all)
    before = distillation_loss(student, teacher, x_all, config.temperature, targets=cached)
    # The held-out slice, never trained on; the weights of its best measurement are kept. Spread evenly over the
    # inputs (the last of every N / n_held), not the last ones: a folder read class by class would otherwise hold
    # out its last class only, which training on the others does not improve.
    n_all = len(x_all)
    n_held = int(round(config.held_out * n_all)) if n_all >= 10 else 0
    held_idx = (np.arange(1, n_held + 1) * n_all) // n_held - 1 if n_held else np.zeros(0, dtype=np.int64)
    train_idx = torch.from_numpy(np.setdiff1d(np.arange(n_all), held_idx))
    n_train = len(train_idx)
    held = x_all.subset(held_idx) if n_held else None
    held_targets = cached[torch.from_numpy(held_idx).to(cached.device)] if cached is not None and n_held else None

    def held_loss() -> float | None:
        if held is None:
            return None
        return distillation_loss(student, teacher, held, config.temperature, targets=held_targets)

    watched = [{"step": 0, "loss": held_loss()}]
    best = {"step": 0, "loss": watched[0]["loss"], "state": {n: p.detach().clone() for n, p in params.items()}}
    stopped = None
    if held is not None and watched[0]["loss"] < config.nothing_below:
        stopped = "nothing to heal: the held-out loss was already below nothing_below"
    steps = config.steps
    if config.max_epochs:
        steps = min(steps, max(1, math.ceil(config.max_epochs * n_train / config.batch_size)))
    opt = torch.optim.Adam(list(params.values()), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n_train, generator=gen)
    pos, running, history = 0, None, []
    every = max(1, steps // 10)
    bar = progress_bar(range(0 if stopped else steps), enabled=progress, desc="healing", unit="step")
    since_best = 0
    try:
        for step in bar:
            if pos + config.batch_size > len(order):
                order, pos = torch.randperm(n_train, generator=gen), 0
            rows = train_idx[order[pos:pos + config.batch_size]]
            pos += config.batch_size
            mine = rows[rank::world]  # data parallel under torchrun: each rank a share of every batch
            x = data.rows(mine.numpy())
            if cached is not None and len(x) == len(mine):  # (a batch with skipped unreadable images runs the teacher)
                target = cached[mine.to(cached.device)]
            else:
                with torch.no_grad():
                    target = teacher(x)
            loss = _loss(student(x), target, config.temperature, bare) * _share(x, target, len(rows), bare, world)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:
                _all_reduce_grads(params.values())
            opt.step()
            value = float(loss.detach()) if world == 1 else sum_over_ranks(float(loss.detach()))[0]
            running = value if running is None else 0.95 * running + 0.05 * value
            if progress:
                bar.set_postfix(loss=f"{running:.4f}")
            if (step + 1) % every == 0 or step + 1 == steps:
                history.append({"step": step + 1, "loss": running})
                if held is not None:
                    value = held_loss()
                    watched.append({"step": step + 1, "loss": value})
                    if math.isfinite(value) and value < best["loss"]:
                        best = {"step": step + 1, "loss": value,
                                "state": {n: p.detach().clone() for n, p in params.items()}}
                        since_best = 0
                    else:
                        since_best += 1
                    if config.patience and since_best >= config.patience:
                        stopped = f"the held-out loss did not improve in {since_best} measurements"
                        break
    finally:
        for p, r in zip(frozen, was):
            p.requires_grad_(r)
        bar.close()
    if held is not None and best["step"] != (watched[-1]["step"] if watched else 0):
        with torch.no_grad():  # back to the best measured weights (the unhealed ones if healing never helped)
            for n, p in params.items():
                p.copy_(best["state"][n])
    student.eval()
    after = distillation_loss(student, teacher, x_all, config.temperature, targets=cached)
    return {"loss_before": before, "loss_after": after, "trained": sorted(params), "seconds": time.perf_counter() - t0,
            "held_out": {"inputs": n_held, "losses": watched, "best_step": best["step"] if held is not None else None},
            "steps_run": watched[-1]["step"] if held is not None else steps, "steps_planned": steps,
            "stopped": stopped,
            "history": history, "config": config.to_dict()}
