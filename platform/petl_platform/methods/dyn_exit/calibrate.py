"""Threshold calibration for Dyn-Adapter's dynamic inference (Sec. 3.4; METHODS.md: "thresholds are
calibrated on validation data to meet a compute budget").

Every exit's softmax is computed once on the validation split. A sample leaves at the first early
exit ``i`` whose max probability is ``>= thresholds[i]`` (else at the last exit); its cost is the
per-sample FLOPs actually run up to there (embedding, the blocks of stages ``1..i`` and the heads
of exits ``1..i``, from ``model.flop_profile()``). The search, not fixed by the paper:

1. a grid over one threshold shared by all exits (candidates = quantiles of the exits' confidences);
2. coordinate ascent: per exit, try every candidate with the others fixed, keep a change if it
   stays within the budget and raises validation accuracy (ties: fewer FLOPs); up to 3 passes.

Objective: maximise validation accuracy subject to mean FLOPs / full-depth FLOPs <= ``budget``.
"""

from __future__ import annotations

import numpy as np
import torch

from ...errors import PetlError
from .model import NEVER

N_CANDIDATES = 101


@torch.no_grad()
def exit_probabilities(model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Softmax of every exit, ``(S, N, C)``, full depth (one pass per batch)."""
    model.eval()
    device = model.exit_thresholds.device
    parts = [torch.stack([z.float().softmax(-1) for z in model.all_exit_logits(x[i:i + batch_size].to(device))]).cpu()
             for i in range(0, len(x), batch_size)]
    return torch.cat(parts, dim=1)


def exit_costs(model) -> np.ndarray:
    """Per-sample FLOPs fraction (of ``model(x)``) when exiting at stage ``0 .. S-1``."""
    prof = model.flop_profile()
    per_stage = np.cumsum([s + h for s, h in zip(prof["stage"], prof["head"])]) + prof["embed"]
    return per_stage / prof["full"]


def _simulate(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, thr: np.ndarray):
    passed = np.vstack([conf >= thr[:, None], np.ones((1, conf.shape[1]), bool)])
    stage = passed.argmax(0)  # first exit whose threshold is reached
    cols = np.arange(conf.shape[1])
    return correct[stage, cols].mean(), cost[stage].mean(), stage


def search_thresholds(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, budget: float):
    """Thresholds for exits ``1..S-1`` maximising accuracy s.t. mean cost <= budget (see module doc).

    ``conf``: (S-1, N) max probabilities of the early exits; ``correct``: (S, N) bools;
    ``cost``: (S,) FLOPs fractions. Returns ``(thresholds, accuracy, cost, feasible)``.
    """
    qs = np.linspace(0, 1, N_CANDIDATES)
    cands = [np.unique(np.append(np.quantile(c, qs), NEVER)) for c in conf]
    shared = np.unique(np.concatenate(cands))

    def better(acc, flops, best):
        return flops <= budget + 1e-12 and (best is None or acc > best[1] + 1e-12
                                           or (abs(acc - best[1]) <= 1e-12 and flops < best[2]))

    best = None
    for t in shared:
        thr = np.full(len(conf), t)
        acc, flops, _ = _simulate(conf, correct, cost, thr)
        if better(acc, flops, best):
            best = (thr, acc, flops)
    if best is None:  # even exiting everything at exit 1 is over budget: cheapest setting
        thr = np.zeros(len(conf))
        acc, flops, _ = _simulate(conf, correct, cost, thr)
        return thr, acc, flops, False
    for _ in range(3):
        changed = False
        for s in range(len(conf)):
            for c in cands[s]:
                thr = best[0].copy()
                thr[s] = c
                acc, flops, _ = _simulate(conf, correct, cost, thr)
                if better(acc, flops, best):
                    best, changed = (thr, acc, flops), True
        if not changed:
            break
    return best[0], best[1], best[2], True


def _search(model, probs: torch.Tensor, y: torch.Tensor, budget: float):
    if not 0 < budget <= 1.5:
        raise PetlError(f"budget is a fraction of the full-depth FLOPs, e.g. 0.5; got {budget}")
    conf = probs[:-1].amax(-1).numpy()
    correct = (probs.argmax(-1) == y.cpu()[None]).numpy()
    return search_thresholds(conf, correct, exit_costs(model), budget)


def calibrate(model, x_val: torch.Tensor, y_val: torch.Tensor, budget: float, batch_size: int = 256) -> dict:
    """Search per-exit thresholds on ``(x_val, y_val)`` for a FLOPs ``budget`` (fraction of
    full depth, e.g. 0.5) and store them in ``model.exit_thresholds`` (saved with the adapter)."""
    probs = exit_probabilities(model, x_val, batch_size)
    thr, acc, flops, feasible = _search(model, probs, y_val, budget)
    model.exit_thresholds.copy_(torch.as_tensor(thr, dtype=model.exit_thresholds.dtype))
    full_acc = (probs[-1].argmax(-1) == y_val.cpu()).float().mean().item()
    return {"thresholds": [float(t) for t in thr], "val_accuracy": float(acc), "flops_fraction": float(flops),
            "full_val_accuracy": full_acc, "budget": budget, "feasible": feasible}


@torch.no_grad()
def evaluate_dynamic(model, x: torch.Tensor, y: torch.Tensor, thresholds=None, batch_size: int = 256) -> dict:
    """Accuracy and *measured* FLOPs fraction of ``predict_dynamic`` over ``(x, y)``."""
    model.eval()
    device = model.exit_thresholds.device
    correct, flops, full = 0, 0, 0
    stages = torch.zeros(model.stages, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        out = model.predict_dynamic(x[i:i + batch_size].to(device), thresholds)
        correct += (out["logits"].argmax(-1).cpu() == y[i:i + batch_size]).sum().item()
        flops, full = flops + out["flops"], full + out["full_flops"]
        stages += torch.bincount(out["exit_stage"] - 1, minlength=model.stages)
    n = max(1, len(x))
    return {"accuracy": correct / n, "flops_fraction": flops / max(1, full),
            "exit_fractions": (stages.float() / n).tolist()}


def accuracy_flops_curve(model, x_val, y_val, budgets, x_test=None, y_test=None, batch_size: int = 256) -> dict:
    """For each budget: thresholds calibrated on val, then measured on test (when given). The
    model's stored thresholds are left unchanged."""
    probs = exit_probabilities(model, x_val, batch_size)
    x_eval, y_eval = (x_test, y_test) if x_test is not None else (x_val, y_val)
    full = evaluate_dynamic(model, x_eval, y_eval, [NEVER] * (model.stages - 1), batch_size)
    points = []
    for b in budgets:
        thr, acc, flops, feasible = _search(model, probs, y_val, b)
        measured = evaluate_dynamic(model, x_eval, y_eval, thr, batch_size)
        points.append({"budget": b, "thresholds": [float(t) for t in thr], "val_accuracy": float(acc),
                       "val_flops_fraction": float(flops), "feasible": feasible,
                       "accuracy": measured["accuracy"], "flops_fraction": measured["flops_fraction"],
                       "exit_fractions": measured["exit_fractions"]})
    return {"split": "test" if x_test is not None else "val", "full_accuracy": full["accuracy"], "points": points}


def save_curve_png(curve: dict, path, title: str = "Dyn-Adapter: accuracy vs FLOPs") -> str:
    """Plot ``accuracy_flops_curve`` output (measured points + the full-depth accuracy) to a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(curve["points"], key=lambda p: p["flops_fraction"])
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.plot([100 * p["flops_fraction"] for p in pts], [100 * p["accuracy"] for p in pts], "o-", label="dynamic exit")
    ax.axhline(100 * curve["full_accuracy"], color="gray", ls="--", label="full depth")
    ax.set_xlabel(f"measured FLOPs (% of full depth, {curve['split']})")
    ax.set_ylabel(f"accuracy (%, {curve['split']})")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
