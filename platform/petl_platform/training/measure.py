"""Measured (never counted) inference costs of a task model, logged after every epoch: FLOPs from
``torch.utils.flop_counter`` over the ops that really ran, throughput in images per second, and
for dynamic methods the exit distribution (Dyn-*) or the token activation rate (DyT); and for
early-exit methods the budget curve every saved adapter carries (``budget_calibration``)."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..methods.registry import spec_of

EXIT_BUDGET = 0.5  # per-epoch exit statistics: thresholds calibrated on val to this FLOPs fraction


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    dev = _device(model)
    correct = sum((model(x[i:i + batch_size].to(dev)).argmax(-1).cpu() == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    return correct / max(1, len(x))


def exit_probabilities(model, x: torch.Tensor) -> torch.Tensor | None:
    """Every exit's softmax over ``x`` for early-exit methods (one pass), else None."""
    exits = spec_of(model).exits
    return None if exits is None else exits.exit_probabilities(model, x)


def budget_calibration(model, x_val: torch.Tensor, y_val: torch.Tensor, probs: torch.Tensor | None = None) -> dict:
    """The ``adapter_config.json`` entries that let serving pick exit thresholds for a FLOPs budget
    without the task's data (``budget_curve`` on val); ``{}`` for methods without early exits.
    ``probs``: ``exit_probabilities(model, x_val)`` when already computed."""
    exits = spec_of(model).exits
    return {} if exits is None else exits.budget_curve(model, x_val, y_val, probs=probs)


@torch.no_grad()
def inference_metrics(model, x: torch.Tensor, y: torch.Tensor, max_images: int = 256,
                      exit_probs: torch.Tensor | None = None, final: bool = True) -> dict:
    """``gflops_per_image`` (full forward, measured), ``img_per_s`` over up to ``max_images`` of
    ``x``, and per method: ``exit_frac_s{k}`` / ``exit_flops_fraction`` / ``exit_accuracy`` at a
    val-calibrated 50 % budget (Dyn-*), ``activation_rate`` / ``flops_ratio`` (DyT).
    ``exit_probs``: ``exit_probabilities(model, x)`` (all of ``x``) when the caller has it.
    ``final=False`` is a trial's per-epoch set (docs/sweep.md): no timed pass (``img_per_s``, which
    was most of the per-epoch measuring), and Dyn-*'s exit statistics simulated from the one pass
    of every exit (``exit_probs``) instead of measured by two more passes of dynamic inference.
    A trial measures everything at its last epoch."""
    model.eval()
    dev = _device(model)
    x, y = x[:max_images], y[:max_images]
    if exit_probs is not None:
        exit_probs = exit_probs[:, :max_images]
    probe = x[:8].to(dev)
    with FlopCounterMode(display=False) as counter:
        model(probe)
    out = {"gflops_per_image": counter.get_total_flops() / len(probe) / 1e9}
    if final:
        t0 = time.perf_counter()
        for i in range(0, len(x), 64):
            model(x[i:i + 64].to(dev))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        out["img_per_s"] = len(x) / max(1e-9, time.perf_counter() - t0)
    spec = spec_of(model)
    if spec.exits is not None:
        if final:
            point = spec.exits.accuracy_flops_curve(model, x, y, [EXIT_BUDGET], probs=exit_probs)["points"][0]
        else:
            probs = spec.exits.exit_probabilities(model, x) if exit_probs is None else exit_probs
            point = spec.exits.simulated_point(model, probs, y, EXIT_BUDGET)
        out.update({"exit_accuracy": point["accuracy"], "exit_flops_fraction": point["flops_fraction"]})
        out.update({f"exit_frac_s{k + 1}": f for k, f in enumerate(point["exit_fractions"])})
    elif spec.runtime == "token_dispatch":
        _, info = model.infer(x[:64].to(dev))
        out.update({"activation_rate": info["activation_rate"], "flops_ratio": info["flops_ratio"]})
    return out
