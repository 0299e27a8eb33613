"""``petl``: thin subcommands over the library. Bad input → one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from .errors import PetlError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + traceback
        raise PetlError(f"{message} (see '{self.prog} --help')")


def _parse_sets(pairs: list[str]) -> dict:
    out = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PetlError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _vtab_tasks(args) -> None:
    from .data.vtab import discover

    rows = discover(args.vtab_root)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'dataset':22} {'group':11} {'classes':>7} {'train800':>8} {'val200':>6} {'train800val200':>14} {'test':>7}  task")
    for r in rows:
        s = r["sizes"]
        print(f"{r['name']:22} {r['group']:11} {r['num_classes']:>7} {s['train800']:>8} {s['val200']:>6} "
              f"{s['train800val200']:>14} {s['test']:>7}  {r['task']}")
    print(f"{sum(r['group'] != 'other' for r in rows)} of 19 VTAB-1k datasets present")


def cmd_tasks(args) -> None:
    from .data import get_task, list_tasks

    if args.vtab_root:
        return _vtab_tasks(args)
    names = args.names or list_tasks(include_variants=args.variants)
    infos = [get_task(n).info() for n in names]
    if args.json:
        print(json.dumps(infos, indent=2))
        return
    print(f"{'task':22} {'classes':>7} {'train':>7} {'val':>6} {'test':>6}  source")
    for i in infos:
        s = i["sizes"]
        print(f"{i['name']:22} {i['num_classes']:>7} {s['train']:>7} {s['val']:>6} {s['test']:>6}  {i['source']}")


def cmd_methods(args) -> None:
    from .backbones import create_backbone
    from .methods import build_model, get_method, list_methods

    bb = create_backbone(args.backbone)
    rows = []
    for name in list_methods():
        spec = get_method(name)
        model = build_model(name, bb, num_classes=10)
        rows.append({"name": name, "trainable_params": model.num_trainable(), "mergeable": spec.mergeable,
                     "runtime": spec.runtime, "shares_trunk": spec.shares_trunk, "hparams": model.config.to_dict(),
                     "description": spec.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'method':14} {'trainable':>10} {'mergeable':>9} {'runtime':>15}  description")
    for r in rows:
        print(f"{r['name']:14} {r['trainable_params']:>10,} {str(r['mergeable']):>9} {r['runtime']:>15}  {r['description']}")


def _settings(args):
    from .tracking.settings import TrackingSettings

    return TrackingSettings.from_env(getattr(args, "tracking_uri", None), getattr(args, "artifact_root", None),
                                     getattr(args, "storage_path", None))


def _print_registered(r: dict) -> None:
    """The champion decision of one registration, in one line."""
    where = f"@{r['alias']}" if r["champion_moved"] else f"@challenger ({r['alias']} stays v{r['champion_version']})"
    print(f"  registered models:/{r['name']}{where} (version {r['version']}): {r['reason']}")


def _train_spec(args):
    from .training.spec import TrainSpec

    return TrainSpec(task=args.task, method=args.method, backbone=args.backbone, settings=_settings(args),
                     hparams=_parse_sets(args.set), train=_train_overrides(args), budget=args.budget,
                     workers=args.workers, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
                     experiment=args.experiment, name=args.name, address=args.address,
                     max_failures=args.max_failures, local=args.local, register=args.register,
                     promote=args.promote, model_name=args.model_name)


def _sweep_spec(args):
    from .training.spec import SweepSpec
    from .cluster.vtab_suite import DEFAULT_MODEL_NAME

    return SweepSpec(tasks=tuple(t for t in (args.task or "").split(",") if t), method=args.method,
                     backbone=args.backbone, settings=_settings(args), space=tuple(args.space or ()) or None,
                     samples=args.samples, epochs=args.epochs or 10,
                     train={k: v for k, v in _train_overrides(args).items() if k != "epochs"},
                     hparams=_parse_sets(args.set), budget=args.budget, scheduler=args.scheduler,
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
    from .cluster.train import run_train

    result = run_train(spec)  # validates the spec before any cluster starts; registers with --register
    if args.out and result.get("checkpoint"):
        import shutil
        from pathlib import Path

        shutil.copytree(Path(result["checkpoint"]) / "adapter", args.out, dirs_exist_ok=True)
    if args.json:
        print(json.dumps(result, default=str))
        return
    print(f"{args.task} / {args.method} on {args.workers} Ray Train worker(s): test accuracy "
          f"{result.get('test_accuracy', float('nan')):.4f} (val {result.get('val_accuracy', float('nan')):.4f}), "
          f"{result.get('gflops_per_image', 0):.3f} GFLOPs/img measured, MLflow run {result.get('mlflow_run_id')}")
    if "budget_test_accuracy" in result:
        print(f"early exit at budget {args.budget}: test accuracy {result['budget_test_accuracy']:.4f} at "
              f"{result['budget_flops_fraction']:.0%} of full-depth FLOPs")
    if args.out:
        print(f"adapter saved to {args.out}")
    if args.register:
        _print_registered(result["registered"])


def _train_local(spec, args) -> None:
    from .training.run import run_finetune

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
    from .cluster.vtab_suite import format_table, run_vtab_suite

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
    from .cluster.tune import run_sweep

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
        print(f"{s['task']} / {s['method']}: {len(s['trials'])} trials, {s['trial_epochs']} trial-epochs "
              f"(full grid: {s['grid_epochs']}), best val accuracy {b['val_accuracy']:.4f} with {b['params']}")
        if "registered" in s:
            _print_registered(s["registered"])
    print(f"MLflow UI: mlflow ui --backend-store-uri {settings.tracking_uri}")


def cmd_submit(args) -> None:
    from .cluster.jobs import submit

    p = _Parser(prog="petl submit", add_help=False)
    p.add_argument("--address")
    p.add_argument("--no-wait", action="store_true")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    own, rest = p.parse_known_args(args.args)
    _precheck(build_parser().parse_args([args.kind, *rest]))  # bad input fails here, before submitting
    env = _parse_sets(own.env)
    result = submit(args.kind, rest, address=own.address, env=env, wait=not own.no_wait)
    print(f"job {result['job_id']}: {result['status']}")


def _precheck(ns) -> None:
    """What can be checked before submitting (``validate(names_only=True)``): the data, weights,
    stores and cluster are the cluster's, whose ``petl train``/``petl sweep`` checks them."""
    (_sweep_spec if ns.cmd == "sweep" else _train_spec)(ns).validate(names_only=True)


def cmd_serve(args) -> None:
    import subprocess
    import time

    from serve_apps import LOCAL_CONFIG

    config = args.config or LOCAL_CONFIG
    if not os.path.exists(config):
        raise PetlError(f"no Serve config at {config}")
    if args.deploy and not args.address:
        raise PetlError("--deploy needs --address http://HEAD:8265")
    if not args.deploy:  # the local cluster's ingress reads this environment's keys: refuse a malformed
        from .serving.auth import ApiKeys  # PETL_API_KEYS here, not in a replica after the cluster starts

        ApiKeys.from_env()
    if not args.no_check:  # before any cluster starts: refuse when no requested task is servable
        from .serving.catalog_report import check, requested

        check(_settings(args), *requested(config, args.tasks))
    if args.deploy:  # `serve deploy` semantics: the cluster's controller takes the config
        serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
        rc = subprocess.call([serve_cli, "deploy", config, "--address", args.address])
        if rc == 0:
            print("GET /v1/tasks on the cluster's Serve address lists what is servable", flush=True)
        raise SystemExit(rc)
    import ray
    from ray import serve
    from serve_apps.petl_app import run_local, serving_logs_dir

    from .cluster.connect import in_ray_job

    own_cluster = not ray.is_initialized() and not in_ray_job()  # run_local starts a local one
    url = run_local(config, [t for t in (args.tasks or "").split(",") if t] or None, args.port)
    import signal

    def stop(signum, frame):  # `kill PID` stops like Ctrl-C (Serve shut down), not with Ray's stack dump
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"serving on {url}  (docs {url}/docs; Ctrl-C or kill stops)", flush=True)
    print(f"GET {url}/v1/tasks lists what is servable", flush=True)
    logs = serving_logs_dir()
    if logs:
        print(f"Ray Serve's logs (replicas, proxy, access log): {logs}", flush=True)
    try:
        deadline = time.time() + args.duration if args.duration else None
        while deadline is None or time.time() < deadline:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        if own_cluster and ray.is_initialized():
            # Our own local cluster: ray.shutdown() ends Serve with it. serve.shutdown() first only
            # adds Ray's "graceful_shutdown failed ... will be retried" line after a clean stop.
            ray.shutdown()
        else:
            serve.shutdown()


def cmd_jobs(args) -> None:
    from .cluster import jobs as jc

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


def cmd_registry(args) -> None:
    from .tracking import runs

    settings = _settings(args)
    if args.action == "list":
        out = runs.list_models(settings)
    elif args.action == "show":
        if not args.ref:
            raise PetlError("petl registry show needs NAME[@ALIAS|/VERSION]")
        out = runs.show_model(settings, args.ref)
    else:
        if not args.ref or args.version is None:
            raise PetlError("petl registry promote needs NAME VERSION")
        out = runs.promote(settings, args.ref, args.version, args.alias)
    if args.json:
        print(json.dumps(out, default=str))
    elif args.action == "list":
        for r in out:
            aliases = ", ".join(f"{a}→v{v}" for a, v in r["aliases"].items()) or "-"
            print(f"{r['name']:24} versions {r['versions']}  aliases {aliases}")
    else:
        print(f"{out['name']} v{out['version']} aliases {out['aliases'] or '-'} run {out['run_id']}\n  {out['source']}")
        if out["tags"].get("petl.promotion"):
            print(f"  {out['tags']['petl.promotion']}")


def cmd_predict(args) -> None:
    from .cluster.batch import predict_dataset

    out = predict_dataset(args.tasks.split(","), args.input, args.output, _settings(args), backbone=args.backbone,
                          alias=args.alias, batch_size=args.batch_size, address=args.address,
                          progress=not args.no_progress, concurrency=args.concurrency)
    print(json.dumps(out) if args.json else
          f"{out['images']} images ({out['errors']} unreadable) -> {out['output']} in {out['wall_s']:.1f}s "
          f"({out['img_per_s']:.1f} img/s, {out['actors']} {out['device']} actor(s))")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(tasks=args.tasks.split(","), methods=args.methods.split(","), backbone=args.backbone, epochs=args.epochs,
             petl=[m for m in args.petl.split(",") if m], budget=args.budget, sweep=args.sweep or None)


def cmd_bench(args) -> None:
    import subprocess

    script = Path(__file__).resolve().parents[2] / "bench" / "report.py"
    if not script.exists():
        raise PetlError(f"petl bench runs the bench/ scripts of a source checkout (pip install -e .): {script} not found")
    argv = [*(["--quick"] if args.quick else []), *(["--report"] if args.report else []),
            *(["--only", args.only] if args.only else []), *(["--out", args.out] if args.out else [])]
    rc = subprocess.call([sys.executable, str(script), *argv])
    if rc:
        raise SystemExit(rc)


def _train_overrides(args) -> dict:
    keys = ("epochs", "batch_size", "lr", "seed", "device")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def _job_args(p, tasks: bool = False) -> None:
    from .backbones import SHIPPED

    p.add_argument("--task", required=not tasks, help="registry name, NAME-1k, folder:PATH or vtab:ROOT/DATASET[?final]"
                   + (" (comma-separated: one trial set per task)" if tasks else ""))
    p.add_argument("--method", default="linear")
    p.add_argument("--backbone", default=SHIPPED, help="shipped name, timm ViT name, weights file, or ARCH@FILE")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="fixed method hyperparameter (repeatable)")
    p.add_argument("--budget", type=float, help="dyn_* methods: calibrate exits to this fraction of full-depth FLOPs")
    p.add_argument("--address", help="Ray cluster: HOST:6379, auto or ray://HOST:10001 (default: a local cluster)")
    p.add_argument("--name", help="Ray experiment name (sweeps: resume with the same --name --resume)")
    p.add_argument("--experiment", default="petl", help="MLflow experiment")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite under $PETL_HOME)")
    p.add_argument("--artifact-root", help="artifact root of new experiments, e.g. s3://bucket/prefix ($PETL_ARTIFACT_ROOT)")
    p.add_argument("--storage-path", help="Ray storage for checkpoints, a directory or s3:// ($PETL_STORAGE_PATH)")
    p.add_argument("--max-failures", type=int, default=1, help="restarts from the last checkpoint when a worker dies")
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    from .backbones import SHIPPED

    p = _Parser(prog="petl", description="PETL fine-tuning and serving on one frozen ViT")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("tasks", help="list offline tasks")
    t.add_argument("names", nargs="*", help="only these tasks (default: all registry tasks); also folder:PATH "
                   "(ImageFolder PATH/{train,test}/<class>/*.png|jpg, optional val/) or vtab:ROOT/DATASET[?final]")
    t.add_argument("--vtab-root", metavar="ROOT", help="list the VTAB-1k datasets under ROOT "
                   "(ROOT/<dataset>/{train800,val200,train800val200,test}.txt) with group, classes and split sizes")
    t.add_argument("--json", action="store_true")
    t.add_argument("--no-variants", dest="variants", action="store_false", help="omit the -1k variants")
    t.set_defaults(fn=cmd_tasks)

    m = sub.add_parser("methods", help="list PETL methods with trainable-parameter counts")
    m.add_argument("--backbone", default=SHIPPED)
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=cmd_methods)

    tr = sub.add_parser("train", help="fine-tune one task with one method (Ray Train; --local: plain torch)")
    _job_args(tr)
    tr.add_argument("--workers", type=int, default=1, help="Ray Train data-parallel workers")
    tr.add_argument("--cpus-per-worker", type=float, default=1)
    tr.add_argument("--gpu", action="store_true", help="one GPU per worker")
    tr.add_argument("--local", action="store_true", help="run the plain-torch loop in this process, no Ray/MLflow")
    tr.add_argument("--out", help="also copy the adapter artifact to this directory")
    tr.add_argument("--register", action="store_true", help="register the adapter as alias challenger; champion "
                    "moves to it when its val accuracy is >= the champion's on the same val split")
    tr.add_argument("--promote", action="store_true", help="with --register: move champion to it regardless")
    tr.add_argument("--model-name", default="{task}", help="registered model name; {task} and {method} expand")
    tr.set_defaults(fn=cmd_train)

    sw = sub.add_parser("sweep", help="Ray Tune search (ASHA) over a method's hyperparameters; registers the champion")
    _job_args(sw, tasks=True)
    sw.add_argument("--space", action="append", metavar="NAME=DIST(ARGS)",
                    help="uniform(a,b) loguniform(a,b) quniform(a,b,q) randint(a,b) choice(...) grid(...); "
                         "repeatable (default: the method's space)")
    sw.add_argument("--samples", type=int, default=8, help="trials per task (x the grid size for grid(...))")
    sw.add_argument("--scheduler", default="asha", choices=["asha", "fifo"])
    sw.add_argument("--grace-period", type=int, default=1)
    sw.add_argument("--reduction-factor", type=float, default=4, help="ASHA's (Tune's default: 4)")
    sw.add_argument("--max-concurrent", type=int)
    sw.add_argument("--cpus-per-trial", type=float, default=1)
    sw.add_argument("--gpus-per-trial", type=float, help="fractional GPUs per trial (default 0.5 where there are GPUs)")
    sw.add_argument("--resume", action="store_true", help="continue the sweep --name from its Ray storage")
    sw.add_argument("--no-register", dest="register", action="store_false")
    sw.add_argument("--model-name", default="{task}", help="registered model name; {task} and {method} expand")
    sw.add_argument("--alias", default="champion", help="the alias moved only when the best trial is at least as "
                    "good on the same val split (every registration also gets alias challenger)")
    sw.add_argument("--promote", action="store_true", help="move --alias to the best trial regardless")
    sw.add_argument("--suite", choices=["vtab1k"], help="the VTAB-1k protocol over --vtab-root: per dataset a sweep "
                    "on train800/val200, then the best config on train800val200, tested once on test")
    sw.add_argument("--vtab-root", metavar="ROOT", help="--suite vtab1k: ROOT/<dataset>/{train800,val200,train800val200,test}.txt")
    sw.add_argument("--datasets", help="--suite vtab1k: only these datasets (comma-separated; default: all present)")
    sw.set_defaults(fn=cmd_sweep)

    su = sub.add_parser("submit", help="submit `petl train|sweep ARGS` as a Ray job and follow its logs")
    su.add_argument("kind", choices=["train", "sweep"])
    su.add_argument("args", nargs=argparse.REMAINDER,
                    help="the train/sweep arguments, plus --address http://HEAD:8265 (default: a local cluster), "
                         "--no-wait, --env KEY=VALUE (repeatable)")
    su.set_defaults(fn=cmd_submit)

    sv = sub.add_parser("serve", help="serve registered adapters with Ray Serve (serve run / serve deploy semantics)")
    sv.add_argument("--config", help="Serve YAML (default serve_apps/configs/local.yaml)")
    sv.add_argument("--tasks", help="override the config's served tasks (comma-separated registered models)")
    sv.add_argument("--port", type=int)
    sv.add_argument("--deploy", action="store_true", help="deploy the config to --address instead of running it here")
    sv.add_argument("--address", help="Ray dashboard for --deploy, e.g. http://HEAD:8265")
    sv.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    sv.add_argument("--no-check", action="store_true",
                    help="skip looking the tasks up in this machine's MLflow registry first (e.g. when only "
                         "the cluster can reach its registry)")
    sv.set_defaults(fn=cmd_serve)

    jb = sub.add_parser("jobs", help="list, read or stop Ray jobs")
    jb.add_argument("action", choices=["list", "logs", "stop"])
    jb.add_argument("job_id", nargs="?")
    jb.add_argument("--address", help="Ray Jobs API (default $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)")
    jb.add_argument("--follow", action="store_true")
    jb.add_argument("--json", action="store_true")
    jb.set_defaults(fn=cmd_jobs)

    rg = sub.add_parser("registry", help="registered adapters and their aliases (MLflow model registry)")
    rg.add_argument("action", choices=["list", "show", "promote"])
    rg.add_argument("ref", nargs="?", help="NAME, NAME@ALIAS or NAME/VERSION")
    rg.add_argument("version", nargs="?", help="promote: the version to point the alias at")
    rg.add_argument("--alias", default="champion")
    rg.add_argument("--tracking-uri")
    rg.add_argument("--json", action="store_true")
    rg.set_defaults(fn=cmd_registry)

    pr = sub.add_parser("predict", help="score a folder or s3:// prefix of images for many tasks (Ray Data) into parquet")
    pr.add_argument("--tasks", required=True, help="comma-separated registered tasks")
    pr.add_argument("--input", required=True, help="a folder of images (recursive) or s3://bucket/prefix")
    pr.add_argument("--output", required=True, help="the parquet file to write")
    pr.add_argument("--alias", default="champion")
    pr.add_argument("--backbone", default=SHIPPED)
    pr.add_argument("--batch-size", type=int, default=64)
    pr.add_argument("--concurrency", type=int, help="actors (default: one per GPU, else from the cluster's CPUs)")
    pr.add_argument("--address", help="Ray cluster (HOST:6379, auto, ray://HOST:10001; default: a local one)")
    pr.add_argument("--tracking-uri")
    pr.add_argument("--no-progress", action="store_true")
    pr.add_argument("--json", action="store_true")
    pr.set_defaults(fn=cmd_predict)

    d = sub.add_parser("demo", help="fine-tune a few offline tasks on the shipped backbone and print a table")
    d.add_argument("--tasks", default="digits-1k,dsprites_loc-1k,clevr_count-1k")
    d.add_argument("--methods", default="linear")
    d.add_argument("--backbone", default=SHIPPED)
    d.add_argument("--epochs", type=int)
    d.add_argument("--petl", default="dtl,dyn_lora", help="PETL methods fine-tuned on the first task ('' to skip)")
    d.add_argument("--budget", type=float, default=0.5, help="FLOPs budget the dyn_* exits are calibrated to")
    d.add_argument("--sweep", default="dyn_lora", help="method of the closing Ray Tune sweep on the first task ('' to skip)")
    d.set_defaults(fn=cmd_demo)

    b = sub.add_parser("bench", help="run every benchmark side by side; write bench/results/<date>/report.md")
    b.add_argument("--quick", action="store_true", help="the reduced suite (under 15 min on 2 cores)")
    b.add_argument("--only", help="comma list of sections (params, P1-P6, multitenant (P9-P11), predict, serve, P7, colocation, dyt_curve, fidelity)")
    b.add_argument("--out", help="output directory (default bench/results/<today>)")
    b.add_argument("--report", action="store_true", help="only re-render the report from the JSONs in --out")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # MLflow configures its own loggers at INFO on import ("Creating initial MLflow database
    # tables..."); the terminal shows progress and results. A user's own setting wins.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        args = build_parser().parse_args(argv)
        args.fn(args)
    except PetlError as e:
        print(f"petl: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `petl tasks --json | head`
        return 0
    except KeyboardInterrupt:
        print("petl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
