"""Dyn-Adapter early exits over any token-sequential base method: ``dyn_<base>`` (``dyn_lora`` ...).

One generic wrapper, not a copy per method. ``register_dyn_variants()`` (called at the end of
``methods/__init__.py``, after every base method is imported) registers, for each eligible base
method, a ``MethodSpec`` whose model class is ``DynExitMixin`` stacked on the base's model class
(``model.py``) and whose config class is the base's config dataclass extended with the Dyn fields
(``dataclasses.make_dataclass``), so ``build_model("dyn_lora", bb, 10, rank=4, p_m=0.2)`` works and
unknown keys are refused with the full valid list.

Eligible base = token-sequential: the state between blocks is only the token tensor, so running
``vit.blocks[a:b]`` stage by stage and pooling after any block is exactly the base model. Checked
structurally: the base must not override ``forward_blocks``, ``forward_features``, ``forward`` or
``training_step``. Excluded by name, with the reason:

- ``dtl`` / ``dtl_plus``: the inter-block state is the frozen tokens *plus* the side network's
  running state (the CSN output added back from block M on), and the trunk is shared up to M;
  stage-wise exits would need the side state carried and pooled too.
- ``dyt``: its token dispatcher already trains with auxiliary losses (distillation, rate) in its
  own ``training_step`` and skips tokens inside blocks; early exits would drop those losses.
"""

from __future__ import annotations

import dataclasses
import logging

from ..base import PetlModel
from ..config import check
from ..registry import BankLayout, MethodSpec, get_method, list_methods, register_method
from .calibrate import (BUDGETS, EXITS, accuracy_flops_curve, budget_curve, calibrate, exit_probabilities,
                        parse_budget_curve, save_curve_png, thresholds_for_budget)
from .model import DynExitMixin, make_dyn_model_class, stage_weights

log = logging.getLogger(__name__)

PREFIX = "dyn_"
# A variant's recipe and Dyn defaults where a fair basis measured them; every other variant trains
# at TrainConfig's defaults with DYN_FIELDS' (the paper's). Dyn-Adapter: the sweep basis
# (bench/fair_sweep.py, 4 tasks x lr x p_m through `petl sweep`) chose p_m = 0 on every task, and
# lr 0.045 with p_m 0 beat the old recipe (lr 0.015, the paper's p_m 0.1) by 5.1 pt mean val.
_RECIPES = {"adapter": {"lr": 4.5e-2}}
_DYN_DEFAULTS = {"adapter": {"p_m": 0.0}}
EXCLUDED = {
    "dtl": "its side network carries state between blocks besides the tokens",
    "dtl_plus": "its side network carries state between blocks besides the tokens",
    "dyt": "its own training_step (distillation + rate losses) and in-block token skipping",
}
_OVERRIDES_THAT_BREAK_STAGES = ("forward_blocks", "forward_features", "forward", "training_step")

# (name, type, default, help): the Dyn hyperparameters added to the base method's.
DYN_FIELDS = [
    ("stages", int, 4, "S supervision stages; T = depth / S must be an integer"),
    ("lambda_curve", str, "cosine", "shape of the lambda schedule over training progress: cosine | linear"),
    ("lambda_shallow_start", float, 0.1, "lambda of shallow exits at progress 0"),
    ("lambda_deep_start", float, 1.0, "lambda of deep exits at progress 0"),
    ("lambda_bound", float, 0.5, "sup(lambda_shallow) = inf(lambda_deep), reached at progress 1"),
    ("p_shallow", float, 0.5, "branch dropout of the adapters in shallow-stage blocks"),
    ("p_deep", float, 0.1, "branch dropout of the adapters in deep-stage blocks"),
    ("p_m", float, 0.1, "gradient mask probability (Eq. 6)"),
    ("mask_heads", bool, True, "also mask the exit heads' gradients"),
    ("head_policy", str, "balanced", "balanced (MLP heads at shallow exits, linear at deep) | linear | mlp"),
    ("head_hidden", int, 128, "hidden width of the MLP exit heads"),
]
DYN_FIELD_NAMES = [f[0] for f in DYN_FIELDS]


# Searched by default: the dropout rates of shallow / deep stages and the gradient-mask rate
# (Sec. 3.3), plus the base method's rank where it has one, + the lr around the recipe's
# (registry.LR_MULTIPLES). Not the base's own ``dropout``: p_shallow / p_deep supersede it. The
# dropout rates act on the adapter modules in the blocks, so a base without any (the linear probe)
# searches p_m alone: P7 measured p_shallow and p_deep leaving dyn_linear's every epoch unchanged.
DYN_SPACE = {"p_shallow": "uniform(0.1,0.7)", "p_deep": "uniform(0.0,0.3)", "p_m": "choice(0.0,0.1,0.2)"}


def _dyn_space(base_spec: MethodSpec):
    has_modules = base_spec.bank is not None and bool(base_spec.bank.modules)

    def space(depth: int) -> dict[str, str]:
        rank = {k: v for k, v in base_spec.default_space(depth).items() if k == "rank"}
        rates = DYN_SPACE if has_modules else {"p_m": DYN_SPACE["p_m"]}
        return {**rates, **rank}
    return space


def check_dyn_config(cfg) -> None:
    check(cfg.stages >= 2, f"stages must be >= 2 (at least one early exit), got {cfg.stages}")
    check(cfg.lambda_curve in ("cosine", "linear"), f"lambda_curve must be cosine or linear, got {cfg.lambda_curve!r}")
    check(0 <= cfg.lambda_shallow_start <= cfg.lambda_bound <= cfg.lambda_deep_start,
          "need 0 <= lambda_shallow_start <= lambda_bound <= lambda_deep_start "
          f"(got {cfg.lambda_shallow_start}, {cfg.lambda_bound}, {cfg.lambda_deep_start})")
    for key in ("p_shallow", "p_deep", "p_m"):
        check(0 <= getattr(cfg, key) < 1, f"{key} must be in [0, 1), got {getattr(cfg, key)}")
    check(cfg.head_policy in ("balanced", "linear", "mlp"), f"head_policy must be balanced, linear or mlp, got {cfg.head_policy!r}")
    check(cfg.head_hidden >= 1, f"head_hidden must be >= 1, got {cfg.head_hidden}")


def make_dyn_config_class(base_name: str, base_cfg: type, defaults: dict | None = None) -> type:
    """The base config dataclass + ``DYN_FIELDS`` (frozen; validates both on construction);
    ``defaults`` overrides some of ``DYN_FIELDS``' defaults for this variant."""
    defaults = dict(defaults or {})
    unknown = set(defaults) - set(DYN_FIELD_NAMES)
    if unknown:
        raise ValueError(f"no Dyn hyperparameter {sorted(unknown)}")
    clash = set(DYN_FIELD_NAMES) & set(base_cfg.field_names())
    if clash:
        raise ValueError(f"method {base_name!r} already has hyperparameters {sorted(clash)}")
    base_post = getattr(base_cfg, "__post_init__", None)

    def __post_init__(self):
        if base_post is not None:
            base_post(self)
        check_dyn_config(self)

    fields = [(n, t, dataclasses.field(default=defaults.get(n, d), metadata={"help": h})) for n, t, d, h in DYN_FIELDS]
    name = f"Dyn{base_cfg.__name__}"
    cls = dataclasses.make_dataclass(name, fields, bases=(base_cfg,), frozen=True,
                                     namespace={"__post_init__": __post_init__,
                                                "__doc__": f"{base_name} hyperparameters + Dyn-Adapter's ({', '.join(DYN_FIELD_NAMES)})."})
    cls.__module__ = __name__
    globals()[name] = cls
    return cls


def eligible(name: str) -> tuple[bool, str]:
    """Whether base method ``name`` can get early exits, and why not."""
    if name.startswith(PREFIX) or ":" in name:
        return False, "already a Dyn variant"
    if name in EXCLUDED:
        return False, EXCLUDED[name]
    cls = get_method(name).model_cls
    bad = [h for h in _OVERRIDES_THAT_BREAK_STAGES if getattr(cls, h) is not getattr(PetlModel, h)]
    if bad:
        return False, f"it overrides {', '.join(bad)} (not a plain token-sequential block chain)"
    return True, ""


def register_dyn_variants() -> list[str]:
    """Register ``dyn_<base>`` for every eligible registered base method; idempotent. Returns the
    names registered by this call."""
    done = []
    for base in list_methods():
        ok, why = eligible(base)
        if not ok:
            if not base.startswith(PREFIX):
                log.debug("no dyn_%s: %s", base, why)
            continue
        name = PREFIX + base
        if name in list_methods():
            continue
        spec = get_method(base)
        try:
            cfg_cls = make_dyn_config_class(base, spec.config_cls, _DYN_DEFAULTS.get(base))
        except ValueError as e:
            log.warning("no %s: %s", name, e)
            continue
        register_method(MethodSpec(name, make_dyn_model_class(base, spec.model_cls), cfg_cls, runtime="early_exit",
                                   mergeable=spec.mergeable, search_space=_dyn_space(spec), exits=EXITS,
                                   recipe=dict(_RECIPES.get(base, {})),
                                   bank=spec.bank or BankLayout(()),  # the exit heads are banked even over a linear probe
                                   description=f"Dyn-Adapter early exits over {base}"))
        done.append(name)
    return done


__all__ = ["BUDGETS", "DYN_FIELD_NAMES", "DynExitMixin", "EXCLUDED", "EXITS", "accuracy_flops_curve", "budget_curve",
           "calibrate", "eligible", "exit_probabilities", "parse_budget_curve", "register_dyn_variants",
           "save_curve_png", "stage_weights", "thresholds_for_budget"]
