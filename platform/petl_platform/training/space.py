"""A sweep's search space, checked before any trial starts: ``NAME=DIST(ARGS)`` items (or a
method's declared default space) parsed into ``{name: (dist, args)}``, every value tried through the
method's config or ``TrainConfig``. ``cluster.tune`` turns the result into Ray Tune's objects."""

from __future__ import annotations

import ast
import re

from ..errors import PetlError
from .loop import TrainConfig
from .trial import TRAIN_KEYS

DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "choice", "grid")
SEARCHABLE_TRAIN_KEYS = ("lr", "weight_decay", "batch_size", "warmup_epochs", "seed")


def default_space(method: str, depth: int = 12, fixed=()) -> dict[str, str]:
    """The space searched when ``--space`` is not given: the lr, log-uniform around the lr the method
    trains at by default (its recipe's, else ``TrainConfig``'s; ``methods.registry.LR_MULTIPLES``),
    and what the method's spec declares (Dyn-*: p_shallow, p_deep, p_m + the base's rank; DyT: r;
    DTL: M and d'; LoRA/ARC: rank and dropout; Adapter/RepAdapter: bottleneck and dropout), less the
    ``fixed`` keys: what the user set (``--set rank=8``, ``--lr``) stays as set, not searched."""
    from ..methods import get_method

    spec = get_method(method)
    space = spec.default_space(depth, recipe_lr=TrainConfig.from_dict(spec.recipe, "training").lr)
    return {k: v for k, v in space.items() if k not in set(fixed)}


def parse_space(items: list[str] | dict[str, str], method: str) -> dict[str, tuple[str, list]]:
    """``["p_m=choice(0,0.1)", ...]`` → ``{"p_m": ("choice", [0, 0.1])}``, checked against the
    method's hyperparameters (every value tried through its config) before any trial starts."""
    from ..methods import get_method

    pairs = items.items() if isinstance(items, dict) else [i.partition("=")[::2] for i in items]
    cfg_cls = get_method(method).config_cls
    valid = set(cfg_cls.field_names()) | set(SEARCHABLE_TRAIN_KEYS)
    out = {}
    for key, expr in pairs:
        key, expr = key.strip(), expr.strip()
        m = re.fullmatch(r"(\w+)\((.*)\)", expr)
        if not key or not m or m.group(1) not in DISTRIBUTIONS:
            raise PetlError(f"bad --space {key}={expr!r}: expected NAME=DIST(ARGS) with DIST one of "
                            f"{', '.join(DISTRIBUTIONS)}, e.g. p_m=choice(0.0,0.1,0.2)")
        if key not in valid:
            raise PetlError(f"method {method!r} has no hyperparameter {key!r} to search; valid: {', '.join(sorted(valid))}")
        dist = m.group(1)
        try:
            args = list(ast.literal_eval(f"({m.group(2)},)")) if m.group(2).strip() else []
        except (ValueError, SyntaxError):
            raise PetlError(f"bad --space {key}={expr!r}: arguments must be literals") from None
        if not args or (dist in ("uniform", "loguniform", "randint") and len(args) != 2) or \
                (dist == "quniform" and len(args) != 3):
            raise PetlError(f"bad --space {key}={expr!r}: wrong number of arguments for {dist}")
        if dist in ("uniform", "loguniform", "quniform", "randint") and not args[0] < args[1]:
            raise PetlError(f"bad --space {key}={expr!r}: low must be below high")
        probe = args if dist in ("choice", "grid") else args[:2]
        for v in probe:
            if key in TRAIN_KEYS:
                TrainConfig.from_dict({key: v}, "training")
            else:
                cfg_cls.from_dict({key: v}, method)
        out[key] = (dist, args)
    return out
