"""The plain-torch training loop (no Ray): AdamW over trainable parameters only, warmup + cosine,
mixed precision where the device supports it, tqdm progress, evaluation, trainable-state
checkpoints, seeding. Every method trains through ``model.training_step`` the same way."""

from __future__ import annotations

import math
import os
import random
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from ..errors import PetlError
from ..methods.base import PetlModel
from ..methods.config import MethodConfig, check


@dataclass(frozen=True)
class TrainConfig(MethodConfig):
    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-3  # short CPU schedules; methods override via MethodSpec.recipe
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    seed: int = 0
    amp: str = "auto"  # auto (CUDA only) | off | bf16 | fp16
    device: str = "auto"
    cache_trunk: bool = True  # train on cached frozen-trunk states when the method has a shared prefix
    eval_batch_size: int = 256
    checkpoint_dir: str = ""  # write checkpoint.pt (trainable state only) after every epoch
    resume: bool = False  # continue from checkpoint_dir/checkpoint.pt when it exists
    progress: bool = True

    def __post_init__(self):
        check(self.epochs >= 1, "epochs must be >= 1")
        check(self.batch_size >= 1, "batch_size must be >= 1")
        check(self.lr > 0, "lr must be > 0")
        check(self.amp in ("auto", "off", "bf16", "fp16"), "amp must be auto, off, bf16 or fp16")


@dataclass
class TrainResult:
    accuracy: float  # test accuracy after the last epoch
    val_accuracy: float
    trainable_params: int
    wall_s: float
    peak_mem_mb: float
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise PetlError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def _amp_dtype(cfg: TrainConfig, device: torch.device):
    if cfg.amp == "off" or (cfg.amp == "auto" and device.type != "cuda"):
        return None
    if cfg.amp == "fp16":
        return torch.float16
    if cfg.amp == "auto" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _batches(n: int, size: int, generator: torch.Generator | None = None):
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return [order[i:i + size] for i in range(0, n, size)]


class _Inputs:
    """A split as model inputs: raw images, or cached frozen-trunk states (``forward_tail``)."""

    def __init__(self, model, x: torch.Tensor, device, cached: bool, batch_size: int):
        # A lazy split (decoded on access, e.g. a VTAB test set) is never cached: its trunk states
        # would be as large as the float images it avoids holding.
        self.model, self.cached, self.n = model, cached and not getattr(x, "lazy", False), len(x)
        if not self.cached:
            self.x = x
            return
        keep = model.tail_inputs()
        parts = []
        with torch.no_grad():
            for idx in _batches(len(x), batch_size):
                states = model.prefix_states(x[idx].to(device))
                parts.append([s.cpu() if i in keep else None for i, s in enumerate(states)])
        self.states = [torch.cat([p[i] for p in parts]) if i in keep else None for i in range(len(parts[0]))] if parts else []

    def logits(self, idx, device):
        if self.cached:
            return self.model.forward_tail([s[idx].to(device) if s is not None else None for s in self.states])
        return self.model(self.x[idx].to(device, non_blocking=True))

    def batch(self, idx, device):
        return self.x[idx].to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, inputs: _Inputs, y: torch.Tensor, device, batch_size: int) -> float:
    model.eval()
    correct = 0
    for idx in _batches(inputs.n, batch_size):
        correct += (inputs.logits(idx, device).argmax(-1).cpu() == y[idx]).sum().item()
    return correct / max(1, inputs.n)


def _optimizer(model, cfg: TrainConfig):
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise PetlError(f"method {model.method!r} has no trainable parameters")
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)


def _sync_grads(params: list[torch.nn.Parameter], world: int) -> None:
    """Data parallelism over the trainable parameters only (the frozen backbone has no gradients,
    so there is nothing else to reduce): average gradients across the process group. Each rank
    applies its own gradient mask first, so the averaged update is identical everywhere."""
    import torch.distributed as dist

    for p in params:
        if p.grad is None:  # every rank must join every all_reduce
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world


def load_checkpoint(path: Path, device) -> dict:
    """A ``checkpoint.pt`` written by ``train``: tensors, dicts, lists and numbers only. Checkpoints
    come back from shared Ray storage (S3 in production), so arbitrary pickled objects, which
    run code as they load, are refused (``weights_only=True``)."""
    import pickle

    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PetlError(f"checkpoint {path} is not a plain tensor checkpoint, refusing to load it: {first[:200]}") from None
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "history") if not isinstance(state, dict) or k not in state]
    if missing:
        raise PetlError(f"checkpoint {path} lacks {', '.join(missing)}; was it written by petl's training loop?")
    return state


def train(model, data: dict, cfg: TrainConfig = TrainConfig(),
          callbacks: list[Callable[[int, dict], None]] = (), rank: int = 0, world: int = 1) -> TrainResult:
    """Train ``model`` on ``data`` (``{split: (x, y)}`` tensors); returns test/val accuracy and costs.

    ``callbacks`` get ``(epoch, metrics)`` after each epoch (MLflow / Ray Tune report there).
    With ``world > 1`` (an initialised ``torch.distributed`` group, e.g. a Ray Train worker),
    each rank trains on its shard of every batch and gradients are averaged; rank 0 evaluates.
    """
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.time()
    # Methods with a frozen prefix and no augmentation: compute the prefix once, not every epoch.
    # The cached path trains with plain cross-entropy, so a method with its own training_step
    # (auxiliary losses) always takes the full path.
    cached = (cfg.cache_trunk and model.shared_prefix_blocks > 0
              and type(model).training_step is PetlModel.training_step)
    inputs = {s: _Inputs(model, x, device, cached, cfg.eval_batch_size) for s, (x, _) in data.items()}
    y_train = data["train"][1]
    opt = _optimizer(model, cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = math.ceil(len(y_train) / cfg.batch_size)
    total, warm = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / max(1, warm) if s < warm else
                                              0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ckpt = Path(cfg.checkpoint_dir) / "checkpoint.pt" if cfg.checkpoint_dir else None
    start_epoch, history = 0, []
    if cfg.resume and ckpt and ckpt.exists():
        state = load_checkpoint(ckpt, device)
        model.load_trainable_state(state["model"], source=str(ckpt))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(start_epoch):  # replay the shuffles so a resumed run sees the same batches
        torch.randperm(len(y_train), generator=gen)
    bar = tqdm(total=total, initial=start_epoch * steps_per_epoch, disable=not cfg.progress, unit="step",
               mininterval=1.0, dynamic_ncols=True)
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = time.perf_counter()
        model.train()
        losses, correct, seen = [], 0, 0
        bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
        for i, idx in enumerate(_batches(len(y_train), cfg.batch_size, gen)):
            if world > 1:
                if len(idx) < world:
                    continue  # a tail smaller than the group: every rank skips it alike
                idx = idx.tensor_split(world)[rank]
            y = y_train[idx].to(device)
            progress = (epoch * steps_per_epoch + i) / max(1, total)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                if cached:
                    logits = inputs["train"].logits(idx, device)
                    loss = torch.nn.functional.cross_entropy(logits, y)
                else:
                    out = model.training_step(inputs["train"].batch(idx, device), y, progress)
                    loss, logits = out.loss, out.logits
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            model.after_backward()
            if world > 1:
                _sync_grads(trainable, world)
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            correct += (logits.argmax(-1) == y).sum().item()
            seen += len(idx)
            bar.update()
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "train_accuracy": correct / seen,
                   "lr": sched.get_last_lr()[0]}
        if rank == 0 and "val" in data and len(data["val"][1]):
            metrics["val_accuracy"] = evaluate(model, inputs["val"], data["val"][1], device, cfg.eval_batch_size)
        metrics["epoch_s"] = time.perf_counter() - t_epoch  # the loop's own epoch: train steps + val
        history.append(metrics)
        if ckpt:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"model": model.trainable_state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "epoch": epoch, "history": history}, tmp)
            os.replace(tmp, ckpt)
        if "val_accuracy" in metrics:
            bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", val_acc=f"{metrics['val_accuracy']:.3f}")
        for cb in callbacks:
            cb(epoch, metrics)
    bar.close()
    test_acc = (evaluate(model, inputs["test"], data["test"][1], device, cfg.eval_batch_size)
                if rank == 0 and "test" in data else float("nan"))
    return TrainResult(accuracy=test_acc, val_accuracy=history[-1].get("val_accuracy", float("nan")) if history else float("nan"),
                       trainable_params=model.num_trainable(), wall_s=time.time() - t0,
                       peak_mem_mb=peak_memory_mb(device), history=history)
