"""Method-specific behaviour goes through ``MethodSpec`` hooks: no module of the library outside
``methods/`` imports one method's internals (``methods.dyn_exit``); calibrated early exits are
reached through ``MethodSpec.exits`` (the ``EarlyExits`` protocol), which every ``early_exit``
method's spec gives and no other does; ``--budget`` is checked by the spec."""

import ast
import inspect
from pathlib import Path

import pytest
import torch

from petl_platform.errors import PetlError
from petl_platform.methods import build_model, get_method, list_methods
from petl_platform.methods.registry import BUDGET_MAX, EarlyExits, MethodSpec, spec_of

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "petl_platform"
INTERNAL = "petl_platform.methods.dyn_exit"


def _imported_modules(path: Path, source: str | None = None) -> list[tuple[int, str]]:
    """``(line, absolute module)`` of every import in ``path`` of the package (relative ones
    resolved; ``from X import y`` counts as both ``X`` and ``X.y``, since ``y`` may be a submodule)."""
    package = ("petl_platform", *path.relative_to(PACKAGE).parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text() if source is None else source, str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - (node.level - 1)]
                base = ".".join((*anchor, *([base] if base else [])))
            out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def test_no_module_outside_methods_imports_dyn_exit():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "methods":
            continue
        for line, module in _imported_modules(path):
            if module == INTERNAL or module.startswith(INTERNAL + "."):
                offenders.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}")
    assert not offenders, "go through MethodSpec.exits instead:\n" + "\n".join(offenders)


def test_the_scan_sees_every_spelling():
    """The scan is not vacuous: relative, absolute and package-level imports are all caught."""
    source = ("def f():\n"
              "    from ..methods.dyn_exit.calibrate import budget_key\n"
              "    from ..methods import dyn_exit\n"
              "    import petl_platform.methods.dyn_exit.calibrate\n"
              "    from .spec import check_budget\n")
    found = [m for _, m in _imported_modules(PACKAGE / "training" / "probe.py", source)
             if m == INTERNAL or m.startswith(INTERNAL + ".")]
    assert set(found) == {INTERNAL, f"{INTERNAL}.calibrate", f"{INTERNAL}.calibrate.budget_key"}


def test_exits_exactly_on_early_exit_methods():
    with_exits = [m for m in list_methods() if get_method(m).exits is not None]
    early = [m for m in list_methods() if get_method(m).runtime == "early_exit"]
    assert with_exits == early and "dyn_lora" in early and "lora" not in early
    hooks = [name for name, _ in inspect.getmembers(EarlyExits, inspect.isfunction) if not name.startswith("_")]
    assert {"calibrate", "budget_curve", "parse_budget_curve", "thresholds_for_budget"} <= set(hooks)
    for m in early:
        exits = get_method(m).exits
        for name in hooks:
            got, want = inspect.signature(getattr(exits, name)), inspect.signature(getattr(EarlyExits, name))
            assert list(got.parameters) == list(want.parameters)[1:], (m, name)  # want's first is self


def test_a_spec_cannot_mismatch_exits_and_runtime():
    spec = get_method("dyn_linear")
    with pytest.raises(ValueError, match="exits are given by early_exit methods"):
        MethodSpec("bad", spec.model_cls, spec.config_cls, runtime="early_exit")
    with pytest.raises(ValueError, match="exits are given by early_exit methods"):
        MethodSpec("bad", spec.model_cls, spec.config_cls, runtime="per_row_adapter", exits=spec.exits)


@pytest.mark.parametrize("method, budget, message", [
    ("dyn_lora", None, None),
    ("lora", None, None),
    ("dyn_lora", 0.5, None),
    ("dyn_lora", BUDGET_MAX, None),
    ("dyn_lora", float("nan"), "--budget is the fraction of full-depth FLOPs the early exits may spend, "
                               "0 < budget <= 1.5 (e.g. 0.5); got nan"),
    ("dyn_lora", 2.0, "--budget is the fraction of full-depth FLOPs"),
    ("dyn_lora", True, "--budget is the fraction of full-depth FLOPs"),
    ("lora", float("inf"), "--budget is the fraction of full-depth FLOPs"),  # the range first
    ("lora", 0.5, "--budget applies to early-exit methods (dyn_*), not 'lora'"),
])
def test_spec_checks_the_budget(method, budget, message):
    from petl_platform.training.spec import check_budget

    for check in (get_method(method).check_budget, lambda b: check_budget(method, b)):
        if message is None:
            check(budget)
        else:
            with pytest.raises(PetlError) as e:
                check(budget)
            assert str(e.value).startswith(message)


def test_the_hook_is_the_method_functions(tiny_backbone8):
    import sys

    cal = sys.modules[INTERNAL + ".calibrate"]  # (the package's ``calibrate`` is the function)
    model = build_model("dyn_linear", tiny_backbone8, 3, stages=4)
    exits = spec_of(model).exits
    assert exits.budget_key(0.5) == cal.budget_key(0.5) == "0.5"
    curve = {0.3: [0.9, 0.9, 0.9], 0.6: [0.5, 0.5, 0.5]}
    assert exits.thresholds_for_budget(curve, 0.7) == cal.thresholds_for_budget(curve, 0.7) == [0.5, 0.5, 0.5]
    raw = {"0.3": [0.9, 0.9, 0.9]}
    assert exits.parse_budget_curve(raw, model, "src") == cal.parse_budget_curve(raw, model.stages, "src")
    with pytest.raises(PetlError, match=r"src: budget_thresholds\['0.3'\] must be a list of 3 finite"):
        exits.parse_budget_curve({"0.3": [0.9]}, model, "src")
    torch.manual_seed(0)
    x, y = torch.randn(12, 3, 32, 32), torch.arange(12) % 3
    probs = exits.exit_probabilities(model, x)
    assert torch.equal(probs, cal.exit_probabilities(model, x))
    assert exits.budget_curve(model, x, y, probs=probs) == cal.budget_curve(model, x, y, probs=probs)


def test_a_curve_carried_by_a_model_without_exits_is_refused_on_save(tiny_backbone, tmp_path):
    from petl_platform.tracking.artifacts import CONFIG, save_adapter

    model = build_model("linear", tiny_backbone, 3)
    model.budget_thresholds = {0.5: [0.5]}
    with pytest.raises(PetlError, match=r"budget_thresholds is only for early-exit methods \(dyn_\*\), but this "
                                        "adapter has none; re-save the adapter by training again"):
        save_adapter(model, tmp_path)
    assert not (tmp_path / CONFIG).exists()
