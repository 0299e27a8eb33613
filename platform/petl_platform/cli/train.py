"""``petl train``, ``petl sweep``, ``petl submit`` and ``petl jobs``: runs on a Ray cluster (``train
--local``: in this process), each validated as a ``TrainSpec`` / ``SweepSpec`` before anything starts."""

from __future__ import annotations

import json
import sys

from ..errors import PetlError
from .common import Parser, parse_sets, print_registered, tracking_settings, train_overrides


def _train_spec(args):
    from ..training.spec import TrainSpec

    return TrainSpec(task=args.task, method=args.method, backbone=args.backbone, settings=tracking_settings(args),
                     hparams=parse_sets(args.set), train=train_overrides(args), budget=args.budget,
                     workers=args.workers, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                     experiment=args.experiment, name=args.name, address=args.address,
                     max_failures=args.max_failures, local=args.local, register=args.register,
                     promote=args.promote, model_name=args.model_name)


def _sweep_spec(args):
    from ..training.spec import SweepSpec
    from ..cluster.vtab_suite import DEFAULT_MODEL_NAME

    return SweepSpec(tasks=tuple(t for t in (args.task or "").split(",") if t), method=args.method,
                     backbone=args.backbone, settings=tracking_settings(args), space=tuple(args.space or ()) or None,
                     samples=args.samples, epochs=args.epochs or 10,
                     train={k: v for k, v in train_overrides(args).items() if k != "epochs"},
                     hparams=parse_sets(args.set), budget=args.budget, scheduler=args.scheduler,
                     grace_period=args.grace_period, reduction_factor=args.reduction_factor,
                     max_concurrent=args.max_concurrent, cpus_per_trial=args.cpus_per_trial,
                     gpus_per_trial=args.gpus_per_trial, max_failures=args.max_failures, name=args.name,
                     resume=args.resume, experiment=args.experiment, register=args.register, alias=args.alias,
                     promote=args.promote, address=args.address, suite=args.suite, vtab_root=args.vtab_root,
                     datasets=tuple(d for d in (args.datasets or "").split(",") if d) or None,
                     model_name=DEFAULT_MODEL_NAME if args.suite and args.model_name == "{task}" else args.model_name)


def cmd_train(args) -> None:
    spec = _train_spec(args)
    if spec.local:
        return _train_local(spec, args)
    from ..cluster.train import run_train

    # petl's own lines only: Ray's own output stays in Ray's log files (the first line says where).
    # With --json they go to stderr, so stdout is the one JSON object.
    out = sys.stderr if args.json else sys.stdout
    # validates the spec before any cluster starts; registers with --register
    result = run_train(spec, progress=lambda line: print(line, file=out, flush=True))
    if args.out and result.get("checkpoint"):
        import shutil
        from pathlib import Path

        shutil.copytree(Path(result["checkpoint"]) / "adapter", args.out, dirs_exist_ok=True)
    if args.json:
        print(json.dumps(result, default=str))
        return
    where = "on a Ray trainer" if args.workers == 1 else f"on {args.workers} Ray Train workers"
    print(f"{args.task} / {args.method} {where}: test accuracy "
          f"{result.get('test_accuracy', float('nan')):.4f} (val {result.get('val_accuracy', float('nan')):.4f}), "
          f"{result.get('gflops_per_image', 0):.3f} GFLOPs/img measured, MLflow run {result.get('mlflow_run_id')}")
    if "budget_test_accuracy" in result:
        print(f"early exit at budget {args.budget}: test accuracy {result['budget_test_accuracy']:.4f} at "
              f"{result['budget_flops_fraction']:.0%} of full-depth FLOPs")
    if args.out:
        print(f"adapter saved to {args.out}")
    if args.register:
        print_registered(result["registered"])


def _train_local(spec, args) -> None:
    from ..training.run import run_finetune

    spec.validate()
    result = run_finetune(spec.task, spec.method, backbone=spec.backbone, hparams=spec.hparams,
                          train_overrides=spec.train, out=args.out, budget=spec.budget)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.task} / {args.method}: test accuracy {result['accuracy']:.4f} (val {result['val_accuracy']:.4f}), "
              f"{result['trainable_params']:,} trainable params, {result['wall_s']:.1f}s, peak {result['peak_mem_mb']:.0f} MB")
        if "calibration" in result:
            d = result["dynamic_test"]
            print(f"early exit at budget {args.budget}: test accuracy {d['accuracy']:.4f} at {d['flops_fraction']:.0%} of "
                  f"full-depth FLOPs, exits per stage {[round(f, 2) for f in d['exit_fractions']]}")
        elif "dynamic_test" in result:
            print(f"token dispatch: measured activation rate {result['dynamic_test']['activation_rate']:.2f}, "
                  f"{result['dynamic_test']['flops_ratio']:.0%} of dense FLOPs")
        if args.out:
            print(f"adapter saved to {args.out}")


def _sweep_suite(spec, args) -> None:
    from ..cluster.vtab_suite import format_table, run_vtab_suite

    settings = spec.settings
    s = run_vtab_suite(spec)  # validates the spec before Ray starts
    print(json.dumps(s, default=str) if args.json else format_table(s))
    if not args.json:
        print(f"MLflow suite run {s['parent_run_id']}: mlflow ui --backend-store-uri {settings.tracking_uri}")
    failed = [r["dataset"] for r in s["rows"] if r["error"]]
    if failed:
        raise PetlError(f"{len(failed)} dataset(s) failed and are not averaged: {', '.join(failed)} "
                        f"(reasons in the table and the suite run's petl.vtab.error.* tags)")


def cmd_sweep(args) -> None:
    from ..cluster.tune import run_sweep

    spec = _sweep_spec(args)
    if spec.suite:
        return _sweep_suite(spec, args)
    settings = spec.settings
    summaries = run_sweep(spec)  # validates the spec before Ray or any trial starts
    if args.json:
        print(json.dumps(summaries, default=str))
        return
    for s in summaries:
        b = s["best"]
        test = f" (test {b['test_accuracy']:.4f})" if b.get("test_accuracy") is not None else ""
        print(f"{s['task']} / {s['method']}: {len(s['trials'])} trials, {s['trial_epochs']} trial-epochs "
              f"(full grid: {s['grid_epochs']}), best val accuracy {b['val_accuracy']:.4f}{test} with {b['params']}")
        if "registered" in s:
            print_registered(s["registered"])
    print(f"MLflow UI: mlflow ui --backend-store-uri {settings.tracking_uri}")


def cmd_submit(args) -> None:
    from ..cluster.jobs import submit

    from . import build_parser

    p = Parser(prog="petl submit", add_help=False)
    p.add_argument("--address")
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    own, rest = p.parse_known_args(args.args)
    _precheck(build_parser().parse_args([args.kind, *rest]))  # bad input fails here, before submitting
    env = parse_sets(own.env)
    result = submit(args.kind, rest, address=own.address, env=env, wait=not own.no_wait)
    print(f"job {result['job_id']}: {result['status']}")


def _precheck(ns) -> None:
    """What can be checked before submitting (``validate(names_only=True)``): the data, weights,
    stores and cluster are the cluster's, whose ``petl train``/``petl sweep`` checks them."""
    (_sweep_spec if ns.cmd == "sweep" else _train_spec)(ns).validate(names_only=True)


def cmd_jobs(args) -> None:
    from ..cluster import jobs as jc

    if args.action == "list":
        rows = jc.list_jobs(args.address)
        if args.json:
            print(json.dumps(rows, default=str))
        for r in rows if not args.json else []:
            print(f"{r['job_id']:40} {r['status']:10} {r['entrypoint'][:80]}")
        return
    if not args.job_id:
        raise PetlError(f"petl jobs {args.action} needs a job id")
    if args.action == "logs":
        text = jc.job_logs(args.address, args.job_id, follow_logs=args.follow)
        if not args.follow:
            print(text, end="")
    else:
        print(f"stop requested: {jc.stop_job(args.address, args.job_id)}")
