"""Ray Tune sweeps over a method's hyperparameters (dropout rates, gradient-mask rate, rank, ...):
ASHA early stopping on validation accuracy, one trial set per task, per-trial resources, a
concurrency limit, resumable experiments; every trial an MLflow run under one parent run per task;
the best trial's adapter registered as model ``<task>`` with alias ``challenger``, and ``champion``
moved to it only when it is at least as good on the same val split (``tracking.runs.register_challenger``)."""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..data.registry import task_slug
from ..errors import PetlError
from ..tracking.runs import (ADAPTER_PATH, LOST_BEFORE_CHECKPOINT, RunLogger, client, fail_running, git_commit,
                              mark_failed)
from ..training.spec import SweepSpec
from ..training.trial import PETL_ERROR
from .connect import prepare_tune_actors, ray_error, ray_session, storage
from .trainer import release_idle_trainers

REUSE_ACTORS = True  # bench/trial_overhead.py measures the sweep both ways


def to_tune(space: dict[str, tuple[str, list]], shuffle_seed: int | None = None) -> dict:
    """Ray Tune's domains for a parsed space. ``shuffle_seed``: each ``grid(...)``'s values in an order
    drawn from it (the same for the same seed), for the schedulers that stop trials. ASHA is
    asynchronous: a trial that reaches a rung early is compared with the few results there so far,
    and a grid in ascending order (lr=grid(1e-4,...,1e-2)) makes each new trial the best yet. On
    P7's grid that promoted almost every trial (docs/benchmarks.md, P7)."""
    import random

    from ray import tune

    fns = {"uniform": tune.uniform, "loguniform": tune.loguniform, "quniform": tune.quniform,
           "randint": tune.randint}
    out = {}
    for key, (dist, args) in space.items():
        if dist == "choice":
            out[key] = tune.choice(args)
        elif dist == "grid":
            values = list(args)
            if shuffle_seed is not None:
                random.Random(f"{shuffle_seed}:{key}").shuffle(values)
            out[key] = tune.grid_search(values)
        else:
            out[key] = fns[dist](*args)
    return out


def _tune_trial(config: dict) -> None:
    """The sweep's Tune trainable: tag the trial's MLflow run with its Ray trial id and name."""
    from ray import tune

    ctx = tune.get_context()
    config = {**config, "run_name": ctx.get_trial_name(),
              "tags": {**config["tags"], "ray.trial_id": ctx.get_trial_id()}}
    ray_tune_trial(config)


@contextmanager
def quiet_tune_output():
    """Tune prints nothing itself: every petl Tune run passes ``verbose=0``, and petl's own
    callback prints one line per trial event when the caller asked for progress (``petl sweep``,
    ``petl train``; ``petl demo`` prints its own summary). Tune's default output prints its
    experiment box and TensorBoard hint even at ``verbose=0`` (Ray 2.60); its legacy reporter
    (``RAY_AIR_NEW_OUTPUT=0``, read on each ``fit``) honours ``verbose=0``."""
    old = os.environ.get("RAY_AIR_NEW_OUTPUT")
    if old is None:
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("RAY_AIR_NEW_OUTPUT", None)


def run_sweep(spec: SweepSpec) -> list[dict]:
    """Sweep ``spec.method`` on each of ``spec.tasks``; returns one summary per task (trials, best,
    registered version and the champion decision). ``spec`` is validated first, before Ray or any
    trial starts."""
    return sweep_checked(spec, spec.validate())


def sweep_checked(spec: SweepSpec, parsed: dict) -> list[dict]:
    """``run_sweep`` for a spec already validated; ``parsed``: what ``spec.validate()`` returned."""
    import torch

    path, fs = storage(spec.settings.storage_path)
    # One checkpoint per trial-epoch is the point here; Tune's sync-frequency warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    with ray_session(spec.address, warm=True):
        release_idle_trainers()  # their CPUs go to the trials
        gpus = spec.gpus_per_trial if spec.gpus_per_trial is not None else (0.5 if torch.cuda.is_available() else 0)
        return [_sweep_task(spec, t, parsed, f"{spec.name or spec.method}-{task_slug(t)}", path, fs, gpus)
                for t in spec.tasks]


def _parent_run(settings, experiment, sweep_name, task, method, parsed, resume, sched=None) -> RunLogger:
    c = client(settings)
    if resume:
        exp = c.get_experiment_by_name(experiment)
        found = c.search_runs([exp.experiment_id], f"tags.`petl.sweep` = '{sweep_name}' and tags.`petl.role` = 'sweep'",
                              max_results=1) if exp else []
        if found:
            return RunLogger(settings, experiment, run_id=found[0].info.run_id)
    parent = RunLogger(settings, experiment, run_name=f"sweep {sweep_name}",
                       tags={"petl.role": "sweep", "petl.sweep": sweep_name, "petl.task": task, "petl.method": method,
                             "mlflow.source.git.commit": git_commit()})
    parent.log_params({**{f"space.{k}": f"{d}{tuple(a)}" for k, (d, a) in parsed.items()},
                       **{f"{name}.{k}": v for name, info in (sched or {}).items() for k, v in info.items()}})
    return parent


def scheduler(spec: SweepSpec):
    """Tune's scheduler for ``spec.scheduler`` and what the sweep logs of it (``{"asha": {...}}`` or
    ``{"hyperband": {...}}``, ``{}`` for FIFO): ASHA's rungs and Hyperband's reduction factor come from
    the epoch budget (``training.spec.asha_rungs``: at least three rungs where it allows)."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, HyperBandScheduler

    grace, rf, rungs = spec.asha()
    if spec.scheduler == "asha":
        return (ASHAScheduler(max_t=spec.epochs, grace_period=grace, reduction_factor=rf),
                {"asha": {"grace_period": grace, "reduction_factor": rf, "rungs": rungs}})
    if spec.scheduler == "hyperband":
        return (HyperBandScheduler(max_t=spec.epochs, reduction_factor=rf),
                {"hyperband": {"max_t": spec.epochs, "reduction_factor": rf}})
    return FIFOScheduler(), {}


def _sweep_task(spec: SweepSpec, task: str, parsed: dict, sweep_name: str, path: str, fs, gpus: float) -> dict:
    from ray import tune
    from ..training.trial import trial_config

    settings, method, resume, epochs = spec.settings, spec.method, spec.resume, spec.epochs

    exp_path = f"{path.rstrip('/')}/{sweep_name}"
    exists = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if resume and not exists:
        raise PetlError(f"nothing to resume: no sweep {sweep_name!r} under {settings.storage_path}")
    if exists and not resume:
        raise PetlError(f"sweep {sweep_name!r} already exists under {settings.storage_path}; "
                        "pass --resume to continue it or --name to start another")
    sched, info = scheduler(spec)
    parent = _parent_run(settings, spec.experiment, sweep_name, task, method, parsed, resume, info)
    if spec.progress and "asha" in info:
        print(f"ASHA: trials compared at epochs {', '.join(map(str, info['asha']['rungs']))} of {epochs} "
              f"(grace period {info['asha']['grace_period']}, reduction factor {info['asha']['reduction_factor']:g})",
              flush=True)
    elif spec.progress and "hyperband" in info:
        print(f"Hyperband: brackets of successive halving up to {epochs} epochs (reduction factor "
              f"{info['hyperband']['reduction_factor']:g}); a trial pauses at a rung until its bracket is there",
              flush=True)
    with parent:
        prepare_tune_actors()
        trainable = tune.with_resources(_tune_trial, {"cpu": spec.cpus_per_trial, "gpu": gpus})
        if resume:
            tuner = tune.Tuner.restore(exp_path, trainable, resume_errored=True, storage_filesystem=fs)
        else:
            config = trial_config(task, method, spec.backbone, settings, spec.experiment, spec.hparams,
                                  {**spec.train, "epochs": epochs, "progress": False}, spec.budget,
                                  tags={"mlflow.parentRunId": parent.run_id, "petl.sweep": sweep_name,
                                        "mlflow.source.git.commit": git_commit()})
            # grids in a seeded random order where a scheduler stops trials (to_tune); FIFO as written
            config["search"] = to_tune(parsed, None if spec.scheduler == "fifo" else int(spec.train.get("seed", 0)))
            tuner = tune.Tuner(
                trainable, param_space=config,
                # a finished trial's actor runs the next trial: no new process (torch, timm, MLflow
                # imports) and, through training.trial.loaded, no second load of the backbone and
                # the task's images (docs/sweep.md, "Where a trial's time goes")
                tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", scheduler=sched,
                                            num_samples=spec.samples, max_concurrent_trials=spec.max_concurrent,
                                            reuse_actors=REUSE_ACTORS),
                run_config=tune.RunConfig(name=sweep_name, storage_path=path, storage_filesystem=fs,
                                          failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                                          # Tune's own tables print each trial's whole config
                                          # (tracking settings, tags) and repeat it in every
                                          # "Current best trial" line: one line per event instead
                                          callbacks=[_trial_lines(list(parsed))] if spec.progress else [],
                                          verbose=0))
        t0 = time.time()
        with quiet_tune_output():
            grid = tuner.fit()
        summary = _finalize(grid, settings, task, method, spec.backbone, parsed, epochs, parent)
        summary.update(sweep=sweep_name, wall_s=round(time.time() - t0, 1), parent_run_id=parent.run_id)
        summary.update(info)
        parent.log_metrics({"best_val_accuracy": summary["best"]["val_accuracy"] if summary["best"] else float("nan"),
                            "trial_epochs": summary["trial_epochs"], "trials": len(summary["trials"]),
                            "trials_stopped_early": sum(t["stopped_early"] for t in summary["trials"])}, step=0)
        if spec.register and summary["best"]:
            from ..training.run import register_run

            # the val split's identity is read here, on the driver, after the trials: bad data is a
            # trial's error (tests/test_training_failures.py), not a pre-flight one
            b = summary["best"]
            reg = register_run(settings, task, method, b["run_id"], b["val_accuracy"], model_name=spec.model_name,
                               alias=spec.alias, promote=spec.promote, tags={"sweep": sweep_name})
            summary["registered"] = reg
            parent.set_tags({"petl.registered": f"{reg['name']}/{reg['version']}", "petl.promotion": reg["reason"]})
        if not summary["best"]:
            raise PetlError(f"every trial of sweep {sweep_name!r} failed; first error: {summary['trials'][0]['error']}")
    return summary


def _trial_lines(keys: list[str]):
    """A Tune callback printing one line per trial event with only the searched hyperparameters."""
    from ray import tune

    def fmt(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    class TrialLines(tune.Callback):
        def _line(self, trial, text: str) -> None:
            search = (trial.config or {}).get("search", {})
            params = ", ".join(f"{k}={fmt(search.get(k))}" for k in keys)
            print(f"  trial {trial.trial_id} ({params}): {text}", flush=True)

        def on_trial_start(self, iteration, trials, trial, **info):
            self._line(trial, "started")

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if PETL_ERROR not in result:
                self._line(trial, f"epoch {result.get('training_iteration')}, val accuracy "
                                  f"{result.get('val_accuracy', float('nan')):.4f}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trial, f"done after {(trial.last_result or {}).get('training_iteration', 0)} epoch(s)")

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trial, "failed (Tune retries it up to --max-failures times)")

    return TrialLines()


def _finalize(grid, settings, task, method, backbone, parsed, epochs, parent) -> dict:
    """Close every trial's MLflow run (ASHA-stopped trials are killed mid-run: their adapter is
    logged here from their last checkpoint), pick the best, log the sweep's plots."""
    from ..methods import get_method

    c = client(settings)
    trials = []
    for r in grid:
        m = r.metrics or {}
        run_id = m.get("mlflow_run_id")
        done = int(m.get("training_iteration", 0) or 0)
        # a PetlError ended the trial (its last result says so), or Ray reports the trial errored
        error = m.get(PETL_ERROR) or (str(ray_error(r.error)) if r.error else None)
        search = (r.config or {}).get("search", {})  # None when Tune could not read the trial back
        row = {"run_id": run_id, "params": {k: search.get(k) for k in parsed}, "epochs": done,
               "val_accuracy": None if error else m.get("val_accuracy"),
               # measured at the last epoch only: None for a trial ASHA stopped
               "test_accuracy": None if error else m.get("test_accuracy"),
               "stopped_early": bool(not error and done < epochs), "error": error,
               "checkpoint": r.checkpoint.path if r.checkpoint else None, "timing": trial_timing(r)}
        if run_id and c.get_run(run_id).info.status == "RUNNING":
            if error:
                mark_failed(c, run_id, error)
            else:
                if r.checkpoint:
                    with r.checkpoint.as_directory() as d:
                        c.log_artifacts(run_id, str(Path(d) / ADAPTER_PATH), ADAPTER_PATH)
                c.set_tag(run_id, "petl.stopped_early", str(row["stopped_early"]).lower())
                c.set_terminated(run_id, "FINISHED")
        trials.append(row)
    fail_running(c, c.get_run(parent.run_id).info.experiment_id, f"tags.`mlflow.parentRunId` = '{parent.run_id}'",
                 {t["run_id"] for t in trials}, LOST_BEFORE_CHECKPOINT)
    ok = [t for t in trials if t["error"] is None and t["val_accuracy"] is not None]
    best = max(ok, key=lambda t: (t["val_accuracy"], t["epochs"]), default=None)
    summary = {"task": task, "method": method, "trials": trials, "best": best,
               "trial_epochs": sum(t["epochs"] for t in trials), "grid_epochs": len(trials) * epochs}
    with tempfile.TemporaryDirectory() as tmp:
        for key in parsed:
            parent.log_figure(_scatter(trials, key, Path(tmp) / f"val_accuracy_vs_{key}.png"))
        if best and get_method(method).exits is not None:
            best_ckpt = next(r.checkpoint for r in grid if (r.metrics or {}).get("mlflow_run_id") == best["run_id"])
            for png in _exit_plots(best_ckpt, backbone, task, Path(tmp)):
                parent.log_figure(png)
                c.log_artifact(best["run_id"], str(png), "plots")
    return summary


PER_EPOCH = ("epoch_s", "measure_s", "save_s", "log_s")  # reported by training.trial.run_trial


def trial_timing(result) -> dict:
    """Where one trial's time went, in seconds: ``setup_s`` (run id, backbone, data, model), then
    summed over its epochs the loop's own ``epoch_s`` (train steps + val), ``measure_s`` (FLOPs,
    throughput, exits), ``save_s`` (the adapter checkpoint), ``log_s`` (MLflow), and Tune's
    ``iter_s`` (every epoch from report to report) and ``total_s``; ``{}`` when Tune kept none."""
    try:
        df = result.metrics_dataframe
    except Exception:  # noqa: BLE001 - a trial Tune could not read back: no timing, not a failure
        return {}
    if df is None or df.empty:
        return {}
    out = {k: round(float(df[k].fillna(0).sum()), 3) for k in ("setup_s", *PER_EPOCH) if k in df}  # setup: once
    if "time_this_iter_s" in df:
        out["iter_s"] = round(float(df["time_this_iter_s"].fillna(0).sum()), 3)
    if "time_total_s" in df:
        out["total_s"] = round(float(df["time_total_s"].iloc[-1]), 3)
    return out


def _scatter(trials: list[dict], key: str, path: Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(t["params"][key], t["val_accuracy"], t["epochs"]) for t in trials if t["val_accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    if pts:
        sc = ax.scatter([p[0] for p in pts], [100 * p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis")
        fig.colorbar(sc, ax=ax, label="epochs trained")
    ax.set_xlabel(key)
    ax.set_ylabel("val accuracy (%) at the trial's last epoch")
    ax.set_title(f"sweep: val accuracy vs {key}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _exit_plots(checkpoint, backbone: str, task: str, tmp: Path) -> list[Path]:
    """The best trial's accuracy-vs-FLOPs curve and exit-stage histogram (val, measured)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..backbones import create_backbone
    from ..data import get_task, task_tensors
    from ..methods.registry import spec_of
    from ..tracking.artifacts import load_adapter

    bb = create_backbone(backbone)
    with checkpoint.as_directory() as d:
        model = load_adapter(Path(d) / ADAPTER_PATH, bb)
    exits = spec_of(model).exits
    x_val, y_val = task_tensors(get_task(task), bb)["val"]
    curve = exits.accuracy_flops_curve(model, x_val, y_val, [0.3, 0.4, 0.5, 0.6, 0.7, 0.85, 1.0])
    out = [Path(exits.save_curve_png(curve, tmp / "accuracy_vs_flops.png", f"{task}: best trial, accuracy vs FLOPs"))]
    point = min(curve["points"], key=lambda p: abs(p["budget"] - 0.5))
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    ax.bar([f"exit {k + 1}" for k in range(len(point["exit_fractions"]))], [100 * f for f in point["exit_fractions"]])
    ax.set_ylabel("% of val images")
    ax.set_title(f"{task}: exit stages at a 50 % FLOPs budget")
    fig.tight_layout()
    fig.savefig(tmp / "exit_histogram.png")
    plt.close(fig)
    return out + [tmp / "exit_histogram.png"]


def ray_tune_trial(config: dict) -> None:
    """Ray Tune function trainable: one trial, one worker. Tune retries a trial that raises, and a
    PetlError fails the same way every time, so such a trial ends instead, its last result
    carrying the message (``PETL_ERROR``; the sweep counts it as failed, ``petl train`` raises it)."""
    import logging

    from ray import tune

    from ..training.trial import run_trial

    # One "Checkpoint successfully created at ..." INFO line per epoch reached the terminal (the
    # trial's output goes to the driver); the driver's own callback already prints each epoch.
    logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)

    def end_trial(err: PetlError, run_id: str | None) -> None:
        # val_accuracy is Tune's metric: every result must carry it; NaN is never the best
        tune.report({"val_accuracy": float("nan"), PETL_ERROR: str(err), "mlflow_run_id": run_id})

    run_trial(config, report=tune.report, get_checkpoint=tune.get_checkpoint, checkpoint_cls=tune.Checkpoint,
              on_user_error=end_trial)
