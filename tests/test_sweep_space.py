"""What ``petl sweep`` searches by default and where ASHA compares trials: every method's default
space holds the lr around its recipe's and the method's own rates, every sample of it is a config
the method and the training recipe accept, and ASHA's rungs come from the epoch budget."""

import math

import pytest

from petl_platform.errors import PetlError
from petl_platform.methods import get_method, list_methods
from petl_platform.methods.registry import LR_MULTIPLES
from petl_platform.training.loop import TrainConfig
from petl_platform.training.space import default_space, parse_space
from petl_platform.training.spec import SweepSpec, asha_rungs
from petl_platform.training.trial import split_hparams
from petl_platform.tracking.settings import TrackingSettings
from platform_stack import bench_module

# each method's own dropout / mask rates (none: the method has none, see its spec) and the keys it
# searched before the lr joined
RATES = {"linear": set(), "lora": {"dropout"}, "adapter": {"dropout"}, "repadapter": {"dropout"},
         "arc": {"dropout"}, "arc_att": {"dropout"}, "dtl": set(), "dtl_plus": set(), "dyt": {"target_rate"}}
DYN_RATES = {"p_shallow", "p_deep", "p_m"}  # dyn_linear: p_m only (no adapter branch to drop)
KEPT = {"lora": {"rank"}, "arc": {"rank"}, "adapter": {"bottleneck"}, "repadapter": {"bottleneck"},
        "arc_att": {"rank"}, "dtl": {"m", "rank"}, "dtl_plus": {"m", "rank"}, "dyn_lora": {"rank"}, "dyn_arc": {"rank"}}


def _recipe_lr(method: str) -> float:
    return TrainConfig.from_dict(get_method(method).recipe, "training").lr


def test_every_method_has_an_expected_rate_set():
    assert set(list_methods()) == set(RATES) | {m for m in list_methods() if m.startswith("dyn_")}


@pytest.mark.parametrize("method", list_methods())
def test_default_space_searches_the_lr_and_the_methods_rates(method):
    space = parse_space(default_space(method, depth=12), method)
    rates = ({"p_m"} if method == "dyn_linear" else DYN_RATES) if method.startswith("dyn_") else RATES[method]
    assert {"lr"} | rates | KEPT.get(method, set()) <= set(space), space
    if method.startswith("dyn_"):
        assert "dropout" not in space  # p_shallow / p_deep supersede the base's dropout
    dist, (lo, hi) = space["lr"]
    recipe, (m_lo, m_hi) = _recipe_lr(method), LR_MULTIPLES
    assert dist == "loguniform"
    assert math.isclose(lo, recipe * m_lo, rel_tol=1e-2) and math.isclose(hi, recipe * m_hi, rel_tol=1e-2)
    # every lr the fair basis chose on val for one task alone lies inside
    for task in FAIR.get(method, {}).get("per_task", {}).values():
        assert lo * 0.99 <= task["tuned_lr"] <= hi * 1.01, (method, task)


RECIPE_LR = bench_module("recipe_lr")
FAIR = RECIPE_LR.choose(RECIPE_LR.load())  # method -> the fair basis's choice (bench/recipe_lr.py)


SWEPT = {m: e["recipe"] for m, e in bench_module("fair_sweep").basis()["methods"].items() if "recipe" in e}


def test_the_sweep_basis_chose_the_recipes_of_the_methods_it_completed():
    """A method swept on all 4 tasks (bench/fair_sweep.py) takes the basis's recipe: its lr, and
    the rate searched beside it (the probe's weight decay, Dyn-Adapter's p_m); a rank, bottleneck
    or target rate stays as the papers set it."""
    assert "linear" in SWEPT
    for method, recipe in SWEPT.items():
        spec = get_method(method)
        train, cfg = TrainConfig.from_dict(spec.recipe, "training"), spec.config_cls()
        for key, value in recipe.items():
            have = getattr(train, key) if hasattr(train, key) else getattr(cfg, key)
            assert math.isclose(have, value, rel_tol=1e-6, abs_tol=1e-12), (method, key, have, value)


def test_the_fair_basis_chose_the_recipe_lrs():
    """Each measured method's recipe lr is the one lr that won on val across the fair basis's
    tasks, recomputed here from its runs file; its Dyn variant where the basis measured that.
    A method the sweep basis completed takes that basis's recipe instead (the test above)."""
    assert {"linear", "lora", "adapter", "repadapter", "arc", "dtl", "dtl_plus", "dyt", "dyn_adapter"} <= set(FAIR)
    for method, chosen in FAIR.items():
        if method in SWEPT:
            continue
        assert len(chosen["tasks"]) >= 2 and chosen["epochs"] >= 10, method
        assert math.isclose(_recipe_lr(method), chosen["lr"], rel_tol=1e-6), (method, _recipe_lr(method), chosen["lr"])
    # the choice is a real cross-task one: on some method it is not every task's own best
    assert any(t["tuned_lr"] != c["lr"] for c in FAIR.values() for t in c["per_task"].values())


def test_the_recipe_choice_maximizes_mean_val_over_lrs_run_on_every_task():
    rows = [{"task": t, "method": "m", "seed": 0, "phase": "sweep", "epochs": 10, "lr": lr, "val_accuracy": v,
             "accuracy": v - 0.01}
            for t, by_lr in {"a": {0.01: 0.5, 0.03: 0.8, 0.09: 0.9}, "b": {0.01: 0.7, 0.03: 0.6}}.items()
            for lr, v in by_lr.items()]
    rows.append({**rows[0], "seed": 1, "lr": 0.09, "val_accuracy": 1.0})  # a seed run: not a selection run
    [(name, c)] = RECIPE_LR.choose(rows).items()
    assert c["lr"] == 0.03  # 0.09 wins on a alone, but was never run on b; mean val 0.7 beats 0.6
    assert c["per_task"]["a"]["tuned_lr"] == 0.09 and math.isclose(c["per_task"]["a"]["test_gap_pt"], 10.0)
    assert c["per_task"]["b"]["tuned_lr"] == 0.01 and math.isclose(c["per_task"]["b"]["val_gap_pt"], 10.0)
    assert not c["met"]


@pytest.mark.parametrize("method", list_methods())
def test_every_sample_of_a_default_space_is_a_valid_config(method):
    from petl_platform.cluster.tune import to_tune

    spec = get_method(method)
    space = parse_space(default_space(method, depth=12), method)
    domains = to_tune(space)
    for _ in range(20):
        hp, train = split_hparams({k: d.sample() for k, d in domains.items()})
        assert "lr" in train and set(hp) == set(space) - {"lr"}
        spec.config_cls.from_dict(hp, method)
        assert TrainConfig.from_dict({**spec.recipe, **train}, "training").lr == train["lr"]


def test_what_the_user_fixed_is_left_out_of_the_default_space():
    full = default_space("lora")
    assert set(default_space("lora", fixed=["lr", "rank"])) == set(full) - {"lr", "rank"}
    assert default_space("linear", fixed=["lr"]) == {}


def test_a_method_declaring_its_own_lr_keeps_it():
    from dataclasses import replace

    spec = get_method("linear")
    own = replace(spec, search_space={"lr": "loguniform(0.001,0.01)"})
    assert own.default_space(12, recipe_lr=0.03) == {"lr": "loguniform(0.001,0.01)"}
    assert replace(spec, lr_multiples=None).default_space(12, recipe_lr=0.03) == {}
    with pytest.raises(ValueError, match="lr_multiples"):
        replace(spec, lr_multiples=(3.0, 1.0))


@pytest.mark.parametrize("epochs, expected", [
    (1, (1, 3, [1])),  # one rung: nothing can be stopped
    (2, (1, 2, [1, 2])),
    (3, (1, 3, [1, 3])),
    (4, (1, 2, [1, 2, 4])),
    (8, (1, 2, [1, 2, 4, 8])),
    (9, (1, 3, [1, 3, 9])),
    (10, (1, 3, [1, 3, 9])),
    (27, (1, 3, [1, 3, 9, 27])),
    (100, (1, 3, [1, 3, 9, 27, 81])),
])
def test_asha_rungs_come_from_the_epoch_budget(epochs, expected):
    grace, rf, rungs = asha_rungs(epochs)
    assert (grace, rf, rungs) == expected
    assert rungs[-1] <= epochs
    if epochs >= 4:
        assert len(rungs) >= 3


def test_explicit_asha_values_are_honoured():
    assert asha_rungs(9, reduction_factor=4) == (1, 4, [1, 4])  # Tune's default: two rungs, as P7 ran
    assert asha_rungs(27, grace_period=3) == (3, 3, [3, 9, 27])
    assert asha_rungs(9, grace_period=2) == (2, 2, [2, 4, 8])  # rf still derived, for the most rungs
    assert asha_rungs(10, reduction_factor=2.5) == (1, 2.5, [1, 2.5, 6.25])


@pytest.mark.parametrize("epochs, rf, grace", [(9, None, None), (27, None, None), (8, None, None),
                                               (3, None, None), (9, 4, 1), (10, 2.5, 1), (27, None, 3)])
def test_rungs_are_where_tunes_asha_puts_them(epochs, rf, grace):
    from ray.tune.schedulers import ASHAScheduler

    g, r, rungs = asha_rungs(epochs, rf, grace)
    sched = ASHAScheduler(max_t=epochs, grace_period=g, reduction_factor=r)
    [bracket] = sched._brackets  # Tune's one bracket; its milestones, largest first
    assert sorted(m for m, _ in bracket._rungs) == pytest.approx(rungs)


def test_sweep_spec_derives_and_checks_asha(tmp_path):
    settings = TrackingSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "a"),
                                storage_path=str(tmp_path / "ray"))
    spec = SweepSpec(tasks=("digits-1k",), method="lora", settings=settings, epochs=9)
    assert spec.asha() == (1, 3, [1, 3, 9])
    with pytest.raises(PetlError, match="--grace-period 10 is past"):
        SweepSpec(tasks=("digits-1k",), settings=settings, epochs=9, grace_period=10).validate(names_only=True)
    with pytest.raises(PetlError, match="--reduction-factor must be a finite number > 1"):
        SweepSpec(tasks=("digits-1k",), settings=settings, reduction_factor=1).validate(names_only=True)
    SweepSpec(tasks=("digits-1k",), settings=settings, epochs=9, grace_period=9).validate(names_only=True)


def test_each_scheduler_is_tunes_with_the_derived_budget(tmp_path):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    from petl_platform.cluster.tune import scheduler

    settings = TrackingSettings(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "a"),
                                storage_path=str(tmp_path / "ray"))

    def spec(name, **kw):
        return SweepSpec(tasks=("digits-1k",), method="lora", settings=settings, epochs=9, scheduler=name, **kw)

    sched, info = scheduler(spec("asha"))
    assert isinstance(sched, ASHAScheduler) and info == {"asha": {"grace_period": 1, "reduction_factor": 3, "rungs": [1, 3, 9]}}
    sched, info = scheduler(spec("hyperband"))
    assert isinstance(sched, HyperBandScheduler) and info == {"hyperband": {"max_t": 9, "reduction_factor": 3}}
    assert (sched._max_t_attr, sched._eta) == (9, 3)
    assert scheduler(spec("hyperband", reduction_factor=2.0))[1]["hyperband"]["reduction_factor"] == 2.0
    sched, info = scheduler(spec("fifo"))
    assert isinstance(sched, FIFOScheduler) and info == {}
    with pytest.raises(PetlError, match="unknown scheduler 'bohb'; use asha, hyperband, fifo"):
        spec("bohb").validate(names_only=True)
    with pytest.raises(PetlError, match="--grace-period is ASHA's first rung; --scheduler hyperband takes none"):
        spec("hyperband", grace_period=1).validate(names_only=True)
    with pytest.raises(PetlError, match="--max-concurrent does not go with --scheduler hyperband"):
        spec("hyperband", max_concurrent=2).validate(names_only=True)
