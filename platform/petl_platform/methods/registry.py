"""The method registry: one ``register_method`` call per method folder; duplicates fail loudly."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import unknown
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

    def __post_init__(self):
        if self.runtime not in RUNTIMES:
            raise ValueError(f"method {self.name!r}: runtime must be one of {RUNTIMES}, got {self.runtime!r}")

    @property
    def shares_trunk(self) -> bool:
        """Leading frozen blocks identical across tasks (see docs/architecture.md)."""
        return self.runtime == "shared_trunk"

    @property
    def knobs(self) -> tuple[str, ...]:
        """Per-request compute knobs a task of this method takes (``thresholds``, ``ratio``)."""
        return KNOBS.get(self.runtime, ())

    def default_space(self, depth: int = 12) -> dict[str, str]:
        """The space ``petl sweep`` searches when ``--space`` is not given."""
        return dict(self.search_space(depth) if callable(self.search_space) else self.search_space)


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
