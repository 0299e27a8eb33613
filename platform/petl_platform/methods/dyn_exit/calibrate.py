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

The budget curve travels with the adapter: whenever training writes a Dyn-* artifact it stores
``budget_curve``'s output (thresholds per budget in ``BUDGETS``, calibrated on val) in
``adapter_config.json``; ``load_adapter`` checks it with ``parse_budget_curve`` and serving picks
thresholds with ``thresholds_for_budget``, so a server never needs a task's data.

Code outside ``methods/`` reaches all of this through ``MethodSpec.exits`` (the ``EarlyExits``
protocol of ``methods/registry.py``), which every Dyn-* spec sets to ``EXITS`` (``CalibratedExits``).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from ...errors import PetlError
from ..registry import BUDGET_MAX

NEVER = 2.0  # a threshold no softmax probability reaches: "do not exit here"

log = logging.getLogger(__name__)

N_CANDIDATES = 101
# A FLOPs budget is a fraction of full depth, at most BUDGET_MAX (methods/registry.py).
# The budgets every Dyn-* artifact is calibrated for (the single definition; serving picks among them).
BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def model_input(model, x: torch.Tensor) -> torch.Tensor:
    """``x`` on the model's own device and in its dtype (a served model may be bf16 / fp16)."""
    p = next(model.vit.parameters())
    return x.to(device=p.device, dtype=p.dtype)


@torch.no_grad()
def exit_probabilities(model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Softmax of every exit, ``(S, N, C)``, full depth (one pass per batch)."""
    model.eval()
    parts = [torch.stack([z.float().softmax(-1) for z in model.all_exit_logits(model_input(model, x[i:i + batch_size]))])
             .cpu() for i in range(0, len(x), batch_size)]
    if not parts:
        return torch.empty(model.stages, 0, model.num_classes)
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


def _simulate_many(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, thrs: np.ndarray):
    """``_simulate``'s accuracy and mean cost for K threshold vectors at once (``thrs``: (K, S-1)),
    in chunks of a few million (threshold, sample) pairs to bound memory on large val splits."""
    step = max(1, 4_000_000 // max(1, conf.size))
    accs, costs = [], []
    for k in range(0, len(thrs), step):
        passed = conf[None] >= thrs[k:k + step, :, None]  # (k, S-1, N)
        stage = np.where(passed.any(1), passed.argmax(1), conf.shape[0])  # first exit reached, else the last
        accs.append(correct[stage, np.arange(conf.shape[1])].mean(1))
        costs.append(cost[stage].mean(1))
    return np.concatenate(accs), np.concatenate(costs)


def search_thresholds(conf: np.ndarray, correct: np.ndarray, cost: np.ndarray, budget: float):
    """Thresholds for exits ``1..S-1`` maximising accuracy s.t. mean cost <= budget (see module doc).

    ``conf``: (S-1, N) max probabilities of the early exits; ``correct``: (S, N) bools;
    ``cost``: (S,) FLOPs fractions. Returns ``(thresholds, accuracy, cost, feasible)``.
    Candidates are simulated in one vectorised batch per step and kept in order, as one by one.
    """
    qs = np.linspace(0, 1, N_CANDIDATES)
    cands = [np.unique(np.append(np.quantile(c, qs), NEVER)) for c in conf]
    shared = np.unique(np.concatenate(cands))

    def better(acc, flops, best):
        return flops <= budget + 1e-12 and (best is None or acc > best[1] + 1e-12
                                           or (abs(acc - best[1]) <= 1e-12 and flops < best[2]))

    def scan(thrs, best):
        changed = False
        for thr, acc, flops in zip(thrs, *_simulate_many(conf, correct, cost, thrs)):
            if better(acc, flops, best):
                best, changed = (thr, float(acc), float(flops)), True
        return best, changed

    best, _ = scan(np.repeat(shared[:, None], len(conf), axis=1), None)
    if best is None:  # even exiting everything at exit 1 is over budget: cheapest setting
        thr = np.zeros(len(conf))
        acc, flops, _ = _simulate(conf, correct, cost, thr)
        return thr, acc, flops, False
    for _ in range(3):
        changed = False
        for s in range(len(conf)):  # candidates for exit s, the other exits fixed at the best so far
            thrs = np.repeat(best[0][None], len(cands[s]), axis=0)
            thrs[:, s] = cands[s]
            best, moved = scan(thrs, best)
            changed |= moved
        if not changed:
            break
    return best[0].copy(), best[1], best[2], True


def _search(model, probs: torch.Tensor, y: torch.Tensor, budget: float):
    if not 0 < budget <= BUDGET_MAX:
        raise PetlError(f"budget is a fraction of the full-depth FLOPs, 0 < budget <= {BUDGET_MAX} (e.g. 0.5); "
                        f"got {budget}")
    return search_thresholds(*_exit_arrays(probs, y), exit_costs(model), budget)


def _exit_arrays(probs: torch.Tensor, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``search_thresholds``' ``conf`` (the early exits' max probabilities, (S-1, N)) and ``correct``
    (every exit's hits, (S, N)) from one pass of every exit."""
    return probs[:-1].amax(-1).numpy(), (probs.argmax(-1) == y.cpu()[None]).numpy()


def calibrate(model, x_val: torch.Tensor, y_val: torch.Tensor, budget: float, batch_size: int = 256,
              probs: torch.Tensor | None = None) -> dict:
    """Search per-exit thresholds on ``(x_val, y_val)`` for a FLOPs ``budget`` (fraction of
    full depth, e.g. 0.5) and store them in ``model.exit_thresholds`` (saved with the adapter).
    ``probs``: ``exit_probabilities(model, x_val)`` when the caller already has it."""
    probs = exit_probabilities(model, x_val, batch_size) if probs is None else probs
    thr, acc, flops, feasible = _search(model, probs, y_val, budget)
    model.exit_thresholds.copy_(torch.as_tensor(thr, dtype=model.exit_thresholds.dtype))
    full_acc = (probs[-1].argmax(-1) == y_val.cpu()).float().mean().item()
    return {"thresholds": [float(t) for t in thr], "val_accuracy": float(acc), "flops_fraction": float(flops),
            "full_val_accuracy": full_acc, "budget": budget, "feasible": feasible}


@torch.no_grad()
def evaluate_dynamic(model, x: torch.Tensor, y: torch.Tensor, thresholds=None, batch_size: int = 256) -> dict:
    """Accuracy and *measured* FLOPs fraction of ``predict_dynamic`` over ``(x, y)``."""
    model.eval()
    correct, flops, full = 0, 0, 0
    stages = torch.zeros(model.stages, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        out = model.predict_dynamic(model_input(model, x[i:i + batch_size]), thresholds)
        correct += (out["logits"].argmax(-1).cpu() == y[i:i + batch_size]).sum().item()
        flops, full = flops + out["flops"], full + out["full_flops"]
        stages += torch.bincount(out["exit_stage"] - 1, minlength=model.stages)
    n = max(1, len(x))
    return {"accuracy": correct / n, "flops_fraction": flops / max(1, full),
            "exit_fractions": (stages.float() / n).tolist()}


def accuracy_flops_curve(model, x_val, y_val, budgets, x_test=None, y_test=None, batch_size: int = 256,
                         probs: torch.Tensor | None = None) -> dict:
    """For each budget: thresholds calibrated on val, then measured on test (when given). The
    model's stored thresholds are left unchanged. ``probs``: ``exit_probabilities(model, x_val)``
    when the caller already has it."""
    probs = exit_probabilities(model, x_val, batch_size) if probs is None else probs
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


def simulated_point(model, probs: torch.Tensor, y: torch.Tensor, budget: float) -> dict:
    """``accuracy_flops_curve``'s point for ``budget`` on the split ``probs`` came from, without a
    second pass: thresholds searched on ``probs`` as there, and the accuracy and exit fractions
    simulated from the same one pass (what ``predict_dynamic`` would do with those thresholds), the
    FLOPs fraction from the model's per-exit costs. A trial's per-epoch exit statistics."""
    y = torch.as_tensor(y).cpu()
    thr, acc, flops, feasible = _search(model, probs, y, budget)
    _, _, stage = _simulate(*_exit_arrays(probs, y), exit_costs(model), np.asarray(thr))
    fractions = np.bincount(stage, minlength=model.stages) / max(1, len(stage))
    return {"budget": budget, "thresholds": [float(t) for t in thr], "val_accuracy": float(acc),
            "val_flops_fraction": float(flops), "feasible": feasible, "accuracy": float(acc),
            "flops_fraction": float(flops), "exit_fractions": [float(f) for f in fractions]}


def budget_key(budget: float) -> str:
    """How a budget is spelled in ``adapter_config.json`` (JSON keys are strings): ``"0.5"``."""
    return repr(float(budget))


def budget_curve(model, x_val: torch.Tensor, y_val: torch.Tensor, budgets=BUDGETS,
                 probs: torch.Tensor | None = None, batch_size: int = 256) -> dict:
    """The ``adapter_config.json`` entries of a trained Dyn-* model: per budget, the thresholds of
    exits ``1..S-1`` calibrated on ``(x_val, y_val)``, and what the calibration saw.

    ``{"budget_thresholds": {"0.3": [t_1, ..., t_{S-1}], ...}, "budget_calibration": {"split":
    "val", "samples": N, "full_accuracy": a, "per_budget": {"0.3": {"accuracy", "flops_fraction",
    "feasible"}, ...}}}``. Accuracy and FLOPs are the search's own, simulated from one pass of every
    exit over val (``probs``, reused when the caller has it): exactly what ``predict_dynamic``
    runs, without a second pass per budget. ``{}`` when there is nothing to calibrate on (an empty
    split, or non-finite outputs: such an artifact is refused on load anyway).
    """
    probs = exit_probabilities(model, x_val, batch_size) if probs is None else probs
    if probs.shape[1] == 0 or not torch.isfinite(probs).all():
        log.warning("%s: no budget calibration stored (%s)", getattr(model, "method", "model"),
                    "empty val split" if probs.shape[1] == 0 else "non-finite exit outputs on val")
        return {}
    y = torch.as_tensor(y_val).cpu()
    thresholds, per_budget = {}, {}
    for b in budgets:
        thr, acc, flops, feasible = _search(model, probs, y, b)
        thresholds[budget_key(b)] = [float(t) for t in thr]
        per_budget[budget_key(b)] = {"accuracy": float(acc), "flops_fraction": float(flops), "feasible": bool(feasible)}
    full = (probs[-1].argmax(-1) == y).float().mean().item()
    return {"budget_thresholds": thresholds,
            "budget_calibration": {"split": "val", "samples": int(probs.shape[1]), "full_accuracy": full,
                                   "per_budget": per_budget}}


def parse_budget_curve(raw, stages: int, source: str) -> dict[float, list[float]]:
    """``adapter_config.json``'s ``budget_thresholds`` as ``{budget: [threshold per early exit]}``;
    ``{}`` when absent (an artifact saved before calibrations travelled with it). ``stages`` is the
    model's number of exits (an adapter of a method without early exits must carry no curve: its
    artifact is refused by ``tracking/artifacts.py``). Anything else is refused with a PetlError
    naming ``source``."""
    if raw is None or raw == {}:
        return {}
    fix = "re-save the adapter by training again, or delete the key to serve it with explicit thresholds only"
    if not isinstance(raw, dict):
        raise PetlError(f"{source}: budget_thresholds must map a FLOPs budget to thresholds, "
                        f"got {type(raw).__name__}; {fix}")
    curve = {}
    for key, thr in raw.items():
        try:
            budget = float(key)
        except (TypeError, ValueError):
            budget = math.nan
        if not 0 < budget <= BUDGET_MAX:  # also refuses NaN
            raise PetlError(f"{source}: budget_thresholds key {key!r} is not a FLOPs budget "
                            f"in (0, {BUDGET_MAX}]; {fix}")
        ok = (isinstance(thr, list) and len(thr) == stages - 1
              and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) for t in thr))
        if not ok:
            raise PetlError(f"{source}: budget_thresholds[{key!r}] must be a list of {stages - 1} finite numbers "
                            f"(one per early exit), got {thr!r}; {fix}")
        curve[budget] = [float(t) for t in thr]
    return curve


def thresholds_for_budget(curve: dict, budget: float) -> list[float]:
    """The early-exit thresholds to serve a request for ``budget`` (fraction of full-depth FLOPs):
    those of the largest calibrated budget <= ``budget``, or of the smallest when none fits."""
    if not curve:
        raise PetlError("this adapter was saved without a budget calibration (an older artifact): "
                        "send explicit thresholds")
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= BUDGET_MAX:
        raise PetlError(f"budget is a fraction of the full-depth FLOPs, 0 < budget <= {BUDGET_MAX} (e.g. 0.5); "
                        f"got {budget!r}")
    fitting = [b for b in curve if b <= budget + 1e-9]
    return list(curve[max(fitting) if fitting else min(curve)])


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


class CalibratedExits:
    """Dyn-Adapter's ``EarlyExits`` (``methods/registry.py``): the functions above, looked up when
    called (so a test patching this module's ``exit_probabilities`` sees every caller)."""

    def exit_probabilities(self, model, x):
        return exit_probabilities(model, x)

    def calibrate(self, model, x_val, y_val, budget, probs=None):
        return calibrate(model, x_val, y_val, budget, probs=probs)

    def evaluate_dynamic(self, model, x, y, thresholds=None):
        return evaluate_dynamic(model, x, y, thresholds)

    def budget_curve(self, model, x_val, y_val, probs=None):
        return budget_curve(model, x_val, y_val, probs=probs)

    def accuracy_flops_curve(self, model, x_val, y_val, budgets, x_test=None, y_test=None, probs=None):
        return accuracy_flops_curve(model, x_val, y_val, budgets, x_test, y_test, probs=probs)

    def simulated_point(self, model, probs, y, budget):
        return simulated_point(model, probs, y, budget)

    def save_curve_png(self, curve, path, title="Dyn-Adapter: accuracy vs FLOPs"):
        return save_curve_png(curve, path, title)

    def budget_key(self, budget):
        return budget_key(budget)

    def parse_budget_curve(self, raw, model, source):
        return parse_budget_curve(raw, model.stages, source)

    def thresholds_for_budget(self, curve, budget):
        return thresholds_for_budget(curve, budget)


EXITS = CalibratedExits()
