"""``petl serve`` (Ray Serve, through the one launcher ``serve_apps.petl_app.run_local``) and
``petl predict`` (offline scoring with Ray Data)."""

from __future__ import annotations

import json
import os
import sys

from ..errors import PetlError
from .common import tracking_settings


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
        from ..serving.auth import ApiKeys  # PETL_API_KEYS here, not in a replica after the cluster starts

        ApiKeys.from_env()
    if not args.no_check:  # before any cluster starts: refuse when no requested task is servable
        from ..serving.catalog_report import check, requested

        check(tracking_settings(args), *requested(config, args.tasks))
    if args.deploy:  # `serve deploy` semantics: the cluster's controller takes the config
        serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
        rc = subprocess.call([serve_cli, "deploy", config, "--address", args.address])
        if rc == 0:
            print("GET /v1/tasks on the cluster's Serve address lists what is servable", flush=True)
        raise SystemExit(rc)
    import ray
    from ray import serve
    from serve_apps.petl_app import run_local, serving_logs_dir

    from ..cluster.connect import in_ray_job

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


def cmd_predict(args) -> None:
    from ..cluster.batch import predict_dataset

    out = predict_dataset(args.tasks.split(","), args.input, args.output, tracking_settings(args), backbone=args.backbone,
                          alias=args.alias, batch_size=args.batch_size, address=args.address,
                          progress=not args.no_progress, concurrency=args.concurrency)
    print(json.dumps(out) if args.json else
          f"{out['images']} images ({out['errors']} unreadable) -> {out['output']} in {out['wall_s']:.1f}s "
          f"({out['img_per_s']:.1f} img/s, {out['actors']} {out['device']} actor(s))")
