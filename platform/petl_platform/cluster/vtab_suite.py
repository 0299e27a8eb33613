"""The VTAB-1k protocol on Ray: for each dataset, a Ray Tune sweep (``run_sweep``) trained on
``train800`` and validated on ``val200``; then the best config trained on ``train800val200``
(Ray Train, one worker) and evaluated once on ``test``. One MLflow parent run for the suite holds
each dataset's sweep run and final run as children, per-dataset ``test_accuracy.<dataset>`` and
``val_accuracy.<dataset>``, the group means, both averages (``mean_of_datasets``,
``mean_of_group_means``) and ``vtab/summary.{json,md}``."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from ..errors import PetlError
from ..tracking.runs import RunLogger, client, git_commit
from ..training.spec import SweepSpec, TrainSpec

DEFAULT_MODEL_NAME = "vtab1k-{task}-{method}"


def run_vtab_suite(spec: SweepSpec) -> dict:
    """Run the protocol on the datasets under ``spec.vtab_root`` (``spec.suite == "vtab1k"``);
    returns ``{"rows", "average", ...}``. ``spec`` is validated first, before Ray starts.

    A dataset whose sweep or final fit fails is recorded with its error and left out of the
    averages (listed as missing); the others still run."""
    from ..data.vtab import group_of, suite_average, task_name
    from ..training.run import register_run
    from .connect import ray_session

    parsed = spec.validate()
    chosen = spec.suite_datasets()
    root, method, backbone, settings, space = spec.vtab_root, spec.method, spec.backbone, spec.settings, spec.space
    hparams, train = dict(spec.hparams), {k: v for k, v in spec.train.items() if k != "epochs"}
    name = spec.name or f"vtab1k-{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    # every dataset's sweep and final fit: this spec, already checked, with the dataset as the task
    per_dataset = replace(spec, suite=None, vtab_root=None, datasets=None, name=name, train=train, register=False)
    t0 = time.time()
    with ray_session(spec.address, warm=True):
        import torch

        gpus = spec.gpus_per_trial
        use_gpu = (gpus if gpus is not None else (1 if torch.cuda.is_available() else 0)) > 0
        suite = RunLogger(settings, spec.experiment, run_name=f"vtab1k {name}",
                          tags={"petl.role": "vtab_suite", "petl.suite": "vtab1k", "petl.sweep": name,
                                "petl.method": method, "petl.backbone": backbone, "mlflow.source.git.commit": git_commit()})
        with suite:
            suite.log_params({"root": str(root), "method": method, "backbone": backbone, "epochs": spec.epochs,
                              "samples": spec.samples, "scheduler": spec.scheduler, "datasets": ",".join(d["name"] for d in chosen),
                              "space": "; ".join(space) if space else "default", **{f"hparam.{k}": v for k, v in hparams.items()},
                              **{f"train.{k}": v for k, v in train.items()}})
            rows = []
            for i, d in enumerate(chosen):
                row = {"dataset": d["name"], "group": group_of(d["name"]), "num_classes": d["num_classes"],
                       "sizes": d["sizes"], "test_accuracy": None, "val_accuracy": None, "error": None}
                rows.append(row)
                try:
                    _run_dataset(row, task_name(root, d["name"]), per_dataset, parsed, use_gpu, suite)
                except PetlError as e:
                    row["error"] = str(e)
                    suite.set_tags({f"petl.vtab.error.{d['name']}": str(e)[:4000]})
                if row["test_accuracy"] is not None:
                    suite.log_metrics({f"test_accuracy.{d['name']}": row["test_accuracy"],
                                       f"val_accuracy.{d['name']}": row["val_accuracy"]}, step=0)
                    if spec.register and row.get("final_run_id"):
                        # the final fit is the challenger; the champion moves only if the sweep's best
                        # val accuracy (val200, the split every earlier version was chosen on) is at
                        # least the champion's, or with --promote
                        row["registered"] = register_run(
                            settings, row["task"], method, row["final_run_id"], row["val_accuracy"],
                            model_name=spec.model_name.format(task=d["name"], method=method), alias=spec.alias,
                            promote=spec.promote, tags={"suite": name, "test_accuracy": row["test_accuracy"]})
                suite.log_metrics({"datasets_done": i + 1}, step=i + 1)
            avg = suite_average({r["dataset"]: r["test_accuracy"] for r in rows})
            suite.log_metrics({"mean_of_datasets": avg["mean_of_datasets"], "mean_of_group_means": avg["mean_of_group_means"],
                               "datasets_with_result": avg["datasets"],
                               **{f"group_mean.{g}": v for g, v in avg["group_means"].items()}}, step=0)
            suite.set_tags({"petl.vtab.complete": str(avg["complete"]).lower(),
                            "petl.vtab.missing": ",".join(avg["missing"]) or "-"})
            summary = {"suite": "vtab1k", "name": name, "root": str(root), "method": method, "backbone": backbone,
                       "epochs": spec.epochs, "samples": spec.samples, "rows": rows, "average": avg,
                       "parent_run_id": suite.run_id, "wall_s": round(time.time() - t0, 1)}
            with tempfile.TemporaryDirectory() as tmp:
                (Path(tmp) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
                (Path(tmp) / "summary.md").write_text(format_table(summary) + "\n")
                suite.log_artifacts(tmp, "vtab")
        return summary


def _run_dataset(row: dict, task: str, spec: SweepSpec, parsed: dict, use_gpu: bool, suite: RunLogger) -> None:
    from ..training.trial import split_hparams
    from .train import fit_checked
    from .tune import sweep_checked

    row["task"] = task
    # 1. search: train800 → val200 (Ray Tune; the champion is registered after the final fit instead)
    [s] = sweep_checked(replace(spec, tasks=(task,)), parsed)
    c = client(spec.settings)
    c.set_tag(s["parent_run_id"], "mlflow.parentRunId", suite.run_id)
    c.set_tag(s["parent_run_id"], "petl.vtab.dataset", row["dataset"])
    best = s["best"]
    searched_hp, searched_train = split_hparams(best["params"])
    row.update(val_accuracy=best["val_accuracy"], best_params=best["params"], sweep_run_id=s["parent_run_id"],
               trials=len(s["trials"]))
    # 2. final: the chosen config on train800val200, evaluated once on test
    final = TrainSpec(task=f"{task}?final", method=spec.method, backbone=spec.backbone, settings=spec.settings,
                      hparams={**spec.hparams, **searched_hp}, train={**spec.train, **searched_train, "epochs": spec.epochs},
                      budget=spec.budget, workers=1, use_gpu=use_gpu, cpus_per_worker=spec.cpus_per_trial,
                      experiment=spec.experiment, name=f"{spec.name}-{row['dataset']}-final",
                      max_failures=spec.max_failures,
                      tags={"mlflow.parentRunId": suite.run_id, "petl.role": "vtab_final",
                            "petl.vtab.dataset": row["dataset"], "petl.sweep": spec.name})
    out = fit_checked(final)
    if out.get("test_accuracy") is None:
        raise PetlError(f"final fit on {row['dataset']} reported no test accuracy")
    row.update(test_accuracy=float(out["test_accuracy"]), final_run_id=out.get("mlflow_run_id"))


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def format_table(summary: dict) -> str:
    """The suite as a markdown table (accuracies in %) plus both averages."""
    avg = summary["average"]
    lines = [f"VTAB-1k, {summary['method']} on {summary['backbone']} ({summary['epochs']} epochs, "
             f"{summary['samples']} trials per dataset)", "",
             "| dataset | group | classes | best val (val200) | test (final fit) | best config |",
             "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        cfg = r.get("best_params") or {}
        note = f"failed: {r['error'][:120]}" if r.get("error") else ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in cfg.items())
        lines.append(f"| {r['dataset']} | {r['group']} | {r['num_classes']} | {_pct(r['val_accuracy'])} | "
                     f"{_pct(r['test_accuracy'])} | {note} |")
    groups = ", ".join(f"{g} {_pct(v)}" for g, v in avg["group_means"].items()) or "-"
    lines += ["", f"group means: {groups}",
              f"mean of datasets ({avg['datasets']} of 19): {_pct(avg['mean_of_datasets'])}",
              f"mean of group means ({len(avg['group_means'])} of 3 groups): {_pct(avg['mean_of_group_means'])}"]
    if avg["missing"]:
        lines.append(f"missing (not averaged): {', '.join(avg['missing'])}")
    for r in summary["rows"]:
        if r.get("registered"):
            reg = r["registered"]
            lines.append(f"registered models:/{reg['name']} version {reg['version']}: {reg['reason']}")
    return "\n".join(lines)
