"""The method registry: one ``register_method`` call per method folder; duplicates fail loudly."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import PetlError, unknown
from .config import MethodConfig

# How a task of the method runs in the mixed-task engine (``inference/engine.py``):
# - ``shared_trunk``: its first ``shared_prefix_blocks`` blocks are the frozen backbone, so every
#   such task shares one trunk pass and runs its own ``forward_tail`` (linear, DTL/DTL+);
# - ``per_row_adapter``: its ``AdapterModule``s touch every block; the frozen ops run once for a
#   batch of rows of many tasks and each row gets its own task's deltas (LoRA, Adapter, ...);
# - ``early_exit``: a per-row adapter model with exits (``exit_blocks``), rows leave at their exit;
# - ``token_dispatch``: DyT, active tokens of every task through one frozen MLP call per layer.
RUNTIMES = ("shared_trunk", "per_row_adapter", "early_exit", "token_dispatch")
KNOBS = {"early_exit": ("thresholds",), "token_dispatch": ("ratio",)}  # per-row inference knobs
# A FLOPs budget (``--budget``, a request's ``budget``) is a fraction of full depth. Slightly above 1
# is meaningful: exiting at the last stage also pays for the earlier exits' heads.
BUDGET_MAX = 1.5
# The lr every default search space spans, as multiples of the method's recipe lr. Each recipe lr is
# the one lr that won on val across the fair fidelity basis's tasks (bench/recipe_lr.py); the lr each
# task chose on its own ran from x 1/9 (linear, fashion_mnist-1k) to x 3 of it (adapter,
# fashion_mnist-1k; linear, digits-1k). Log-uniform over [x 1/9, x 9] holds every one of them.
LR_MULTIPLES = (1 / 9, 9.0)


@dataclass(frozen=True)
class BankLayout:
    """How tasks of a method sit in an adapter bank (``inference/banks.py``): a resident task is a
    slot of stacked ``[slots, ...]`` tensors, one per tensor of its trainable state (adapters, head,
    exit heads, buffers), and the engine runs the rows of every task of a bank at a site with their
    weights gathered by slot (the BGMV idea of Punica / S-LoRA).

    ``modules``: the ``AdapterModule`` classes the method injects. Each declares, in its own class,
    its layout (``bank_tensors``: kernel argument -> its tensor; ``bank_static``: what tasks of one
    bank must share, e.g. LoRA's targets and scaling) and its gathered kernel
    (``bank_input_delta`` / ``bank_output_delta``). Heads are ``nn.Linear`` (or ``Sequential``s of
    ``Linear`` and parameter-free modules, Dyn-*'s MLP exits) and need no declaration. Tasks whose
    shapes or static values differ get their own bank: padding a rank-4 LoRA to rank 16 would make it
    pay rank 16's FLOPs and memory."""

    modules: tuple[type, ...]


class EarlyExits(Protocol):
    """Calibrated early exits: everything code outside ``methods/`` does with a model's exits, so
    none of it imports one method's internals. ``MethodSpec.exits`` of every ``early_exit`` method
    (Dyn-*: ``methods/dyn_exit/calibrate.py``'s ``CalibratedExits``); None for every other method.

    A FLOPs ``budget`` is a fraction of full depth in (0, BUDGET_MAX]; a budget curve is
    ``{budget: [threshold per early exit]}``, stored in ``adapter_config.json``'s
    ``budget_thresholds`` under ``budget_key(budget)``."""

    def exit_probabilities(self, model, x):
        """Every exit's softmax over ``x``, ``(S, N, C)``: one full-depth pass."""

    def calibrate(self, model, x_val, y_val, budget: float, probs=None) -> dict:
        """Search the exit thresholds for ``budget`` on val and store them in the model; ``probs``:
        ``exit_probabilities(model, x_val)`` when the caller has it."""

    def evaluate_dynamic(self, model, x, y, thresholds=None) -> dict:
        """Measured accuracy, FLOPs fraction and exit fractions of dynamic inference over ``(x, y)``."""

    def budget_curve(self, model, x_val, y_val, probs=None) -> dict:
        """The ``adapter_config.json`` entries of the budget curve calibrated on val (``{}``: none)."""

    def accuracy_flops_curve(self, model, x_val, y_val, budgets, x_test=None, y_test=None, probs=None) -> dict:
        """Per budget: thresholds calibrated on val, accuracy and FLOPs measured on test (or val)."""

    def simulated_point(self, model, probs, y, budget: float) -> dict:
        """``accuracy_flops_curve``'s point for ``budget`` on the split of ``probs``
        (``exit_probabilities``), simulated from that one pass instead of measured by a second."""

    def save_curve_png(self, curve: dict, path, title: str = ...) -> str:
        """Plot ``accuracy_flops_curve``'s output to a PNG; returns its path."""

    def budget_key(self, budget: float) -> str:
        """How ``budget`` is spelled as a ``budget_thresholds`` key."""

    def parse_budget_curve(self, raw, model, source: str) -> dict[float, list[float]]:
        """An artifact's ``budget_thresholds`` for ``model`` as a curve (``{}`` when absent);
        a malformed one is refused with a PetlError naming ``source``."""

    def thresholds_for_budget(self, curve: dict, budget: float) -> list[float]:
        """The thresholds of ``curve`` to serve a request for ``budget`` (PetlError without a curve)."""


@dataclass(frozen=True)
class MethodSpec:
    name: str
    model_cls: type  # a PetlModel subclass
    config_cls: type[MethodConfig]
    runtime: str  # one of RUNTIMES
    mergeable: bool = False
    description: str = ""
    recipe: dict = field(default_factory=dict)  # default TrainConfig overrides (lr, epochs, ...)
    # default ``petl sweep`` search space: {hparam: "dist(args)"}, or a function of the backbone depth
    search_space: dict[str, str] | Callable[[int], dict[str, str]] = field(default_factory=dict)
    exits: EarlyExits | None = None  # calibrated early exits: given by (and only by) early_exit methods
    # the default space's lr: log-uniform over these multiples of the recipe lr (None: no lr searched);
    # an ``lr`` in ``search_space`` wins
    lr_multiples: tuple[float, float] | None = LR_MULTIPLES
    # how a resident task sits in the engine's adapter banks (per-row runtimes); None: a module tree
    bank: BankLayout | None = None

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"method {self.name!r}: runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if (self.exits is not None) != (self.runtime == "early_exit"):
            raise ValueError(f"method {self.name!r}: exits are given by early_exit methods, and only by them "
                             f"(runtime {self.runtime!r})")
        if self.bank is not None and self.runtime not in ("per_row_adapter", "early_exit"):
            raise ValueError(f"method {self.name!r}: a bank layout is for per-row runtimes, not {self.runtime!r}")
        if self.lr_multiples is not None and not 0 < self.lr_multiples[0] < self.lr_multiples[1]:
            raise ValueError(f"method {self.name!r}: lr_multiples must be (low, high) with 0 < low < high, "
                             f"got {self.lr_multiples}")

    @property
    def shares_trunk(self) -> bool:
        """Leading frozen blocks identical across tasks (see docs/architecture.md)."""
        return self.runtime == "shared_trunk"

    @property
    def knobs(self) -> tuple[str, ...]:
        """Per-request compute knobs a task of this method takes (``thresholds``, ``ratio``)."""
        return KNOBS.get(self.runtime, ())

    def default_space(self, depth: int = 12, recipe_lr: float | None = None) -> dict[str, str]:
        """The space ``petl sweep`` searches when ``--space`` is not given: ``search_space``, and the
        lr around ``recipe_lr`` (the lr this method trains at by default: ``training.space``
        passes it, the training recipe's default not being known here)."""
        space = dict(self.search_space(depth) if callable(self.search_space) else self.search_space)
        if recipe_lr is not None and self.lr_multiples is not None and "lr" not in space:
            lo, hi = self.lr_multiples
            space = {"lr": f"loguniform({recipe_lr * lo:.3g},{recipe_lr * hi:.3g})", **space}
        return space

    def check_budget(self, budget: float | None) -> None:
        """``--budget`` calibrates early exits: only a method with ``exits`` takes one, and it must be
        a finite fraction in (0, BUDGET_MAX]."""
        if budget is None:
            return
        finite = isinstance(budget, (int, float)) and not isinstance(budget, bool) and math.isfinite(budget)
        if not finite or not 0 < budget <= BUDGET_MAX:
            raise PetlError(f"--budget is the fraction of full-depth FLOPs the early exits may spend, "
                            f"0 < budget <= {BUDGET_MAX} (e.g. 0.5); got {budget}")
        if self.exits is None:
            raise PetlError(f"--budget applies to early-exit methods (dyn_*), not {self.name!r}")


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} is already registered (by {_METHODS[spec.name].model_cls.__module__})")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise unknown("method", name, _METHODS)
    return _METHODS[name]


def list_methods() -> list[str]:
    return sorted(_METHODS)


def spec_of(model) -> MethodSpec:
    """The spec of a built model; a merged model (``<method>:merged``) keeps its method's runtime."""
    return get_method(model.method.partition(":")[0])
