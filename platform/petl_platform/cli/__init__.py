"""``petl``: thin subcommands over the library. Bad input → one line on stderr, exit 2.

``main`` and ``build_parser`` are here; each subcommand's ``cmd_*`` lives with its kind: ``info``
(tasks, methods), ``train`` (train, sweep, submit, jobs), ``serve`` (serve, predict), ``registry``,
``demo`` (demo, bench); ``common`` holds what they share."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from ..errors import PetlError
from .common import Parser
from .demo import cmd_bench, cmd_demo
from .info import cmd_methods, cmd_tasks
from .registry import cmd_registry
from .serve import cmd_predict, cmd_serve
from .train import cmd_jobs, cmd_submit, cmd_sweep, cmd_train

__all__ = ["build_parser", "main"]


def _job_args(p, tasks: bool = False) -> None:
    from ..backbones import SHIPPED

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
    from ..backbones import SHIPPED

    p = Parser(prog="petl", description="PETL fine-tuning and serving on one frozen ViT")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)

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
    sw.add_argument("--scheduler", default="asha", choices=["asha", "hyperband", "fifo"],
                    help="asha (default): stop weak trials at rungs; hyperband: Tune's synchronous brackets; "
                         "fifo: every trial runs every epoch")
    sw.add_argument("--grace-period", type=int, help="ASHA's first rung, in epochs (default 1)")
    sw.add_argument("--reduction-factor", type=float,
                    help="ASHA (and Hyperband) keep the best 1/RF of the trials at each rung (rungs at "
                         "grace x RF^k <= --epochs; default: 3 from 9 epochs on, rungs 1, 3, 9, ...; 2 at 2 and "
                         "4-8 epochs)")
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
    b.add_argument("--only", help="comma list of sections (params, P1-P6, multitenant (P5 on banks, P9-P11, M1), predict, serve, P7, colocation, dyt_curve, fidelity)")
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
