"""The Ray Serve application: many tasks on one frozen backbone (import path
``serve_apps.petl_app:build_app``; the Serve YAML in ``serve_apps/configs/`` passes ``args`` and
every deployment's replicas, autoscaling, queue limits and batch settings).

    HTTP → Ingress (FastAPI: auth, validation, decode, preprocessing, fan-out and join)
             ├─► TrunkBackbone       linear / DTL tasks: the frozen trunk once per batch for every
             │                       task that shares it (serving.Batcher across requests and tasks);
             │                       their heads / side-network tails live here too (co-located:
             │                       shipping k+1 trunk states to another replica copies ~k+1 times
             │                       the image's activations for nothing)
             ├─► EarlyExitRouter     Dyn-* tasks: stage by stage, exited samples leave the batch;
             │                       per-request budget / threshold
             ├─► TokenDispatchRouter DyT tasks: only the dispatcher's active tokens reach the frozen
             │                       MLP, those of every task in the batch in ONE call per layer;
             │                       per-request ratio
             └─► TaskAdapters        LoRA / Adapter / RepAdapter / ARC: the frozen ops once for the
                                     batch, each row's own task deltas
Which deployment serves a task follows the runtime its method declares (``MethodSpec.runtime``).
Every deployment answers its whole batch (requests x tasks) with one call of the mixed-task engine
(``petl_platform.inference.Engine``), on the GPU when the replica has one (``num_gpus`` in the
Serve YAML; ``dtype: bf16`` for half precision). Every replica holds the frozen weights once and
loads task adapters from the MLflow registry alias (``models:/<task>@champion``) on demand, off the
event loop, into a byte-budgeted LRU store (``serving/models.py``); alias moves are prefetched in
the background and swap in once loaded; an adapter whose backbone fingerprint differs or that holds
NaN/inf is refused (503 for that task only). The servable tasks are every model registered with the
alias (``serving/catalog.py``): a task registered after the deploy answers on its first request.

The files: ``ingress.py`` (the HTTP front: auth, validation, decode, fan-out and join),
``deployments.py`` (the replicas: backbone, adapter store, batching, metrics), and this module:
``build_app``, ``load_config`` and ``run_local``, the one launcher of ``petl serve`` and ``petl demo``.
"""

from __future__ import annotations

import logging

from ray import serve

from petl_platform.backbones import SHIPPED
from petl_platform.serving.request import MAX_IMAGES, MAX_PIXELS, MAX_REQUEST_PIXELS, parse_tasks
from petl_platform.tracking.settings import CHAMPION

# the deployments and the ingress, re-exported: `serve_apps.petl_app` is the app's one import path
from serve_apps.deployments import (ROLE_OF_RUNTIME, EarlyExitRouter, TaskAdapters, TokenDispatchRouter,  # noqa: F401
                                    TrunkBackbone, _Replica)
from serve_apps.ingress import Ingress, api  # noqa: F401


def build_app(args: dict):
    """Serve app builder (``import_path: serve_apps.petl_app:build_app``). ``args``:

    - ``tasks`` (list or comma string, optional): loaded and warmed up before the replicas report
      ready. Every other task registered with the alias is served on demand, no redeploy needed;
    - ``task_pattern`` (fnmatch, e.g. ``"team-a-*"``) and ``task_tag`` (``KEY=VALUE`` on the
      registered model) narrow what is servable;
    - ``backbone``, ``alias``, ``refresh_s`` (how often the catalog and the aliases are re-read, in
      the background), ``max_body_mb``, ``max_pixels``, ``dtype`` (fp32 | bf16 | fp16);
    - the adapter store of each replica: ``capacity_mb`` (LRU budget on the device), ``host_mb``
      (behind a GPU, in host memory), ``capacity`` (optional cap on resident tasks),
      ``load_timeout_s`` (a request for a cold task waits at most this long, then gets a 503);
    - ``node_cache`` (default true: adapters are fetched once per node by its ``NodeAdapters`` actor
      and read by the replicas from the node's object store; false: each replica downloads its own)
      and ``node_cache_mb`` (that node cache's LRU bound in MB, default 1024); ``eviction`` (the
      store's policy: ``lru``, the default, or ``lfu``);
    - ``deployment_options`` (the YAML's ``deployments`` list) when built in-process rather than by
      ``serve run``/``serve deploy``, which apply that list themselves."""
    tasks = parse_tasks(args["tasks"], limit=None) if args.get("tasks") else []
    # a full queue (max_queued_requests) answers 503 with Retry-After at once, in every deployment
    cpu = {"ray_actor_options": {"num_cpus": float(args.get("num_cpus_per_replica", 0.25))},
           "backpressure_config": {"retry_after_s": 1}}
    opts = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in args.get("deployment_options") or []}

    def bind(dep, *a, **kw):
        return dep.options(**{**cpu, **opts.get(dep.name, {})}).bind(*a, **kw)

    def opt(key, cast):
        return cast(args[key]) if args.get(key) is not None else None

    common = {"backbone": args.get("backbone", SHIPPED), "alias": args.get("alias", CHAMPION),
              "refresh_s": float(args.get("refresh_s", 10.0))}
    store = {"capacity": opt("capacity", int), "capacity_mb": float(args.get("capacity_mb", 256.0)),
             "host_mb": opt("host_mb", float), "load_timeout_s": float(args.get("load_timeout_s", 30.0)),
             "node_cache": bool(args.get("node_cache", True)), "node_cache_mb": float(args.get("node_cache_mb", 1024.0)),
             "eviction": str(args.get("eviction", "lru"))}
    roles = [bind(d, **common, **store, dtype=args.get("dtype"), warm=tasks, threads=opt("threads", int))
             for d in (TrunkBackbone, TaskAdapters, EarlyExitRouter, TokenDispatchRouter)]
    return bind(Ingress, *roles, tasks=tasks, **common, max_body_mb=float(args.get("max_body_mb", 10.0)),
                max_pixels=int(args.get("max_pixels", MAX_PIXELS)), task_pattern=args.get("task_pattern"),
                task_tag=args.get("task_tag"), max_images=int(args.get("max_images", MAX_IMAGES)),
                max_request_pixels=int(args.get("max_request_pixels", MAX_REQUEST_PIXELS)))


def load_config(path: str, tasks: list[str] | None = None, port: int | None = None) -> dict:
    """The Serve YAML with optional overrides: ``{"http_options", "app": {name, route_prefix, args}}``."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f)
    app = dict(cfg["applications"][0])
    args = {**app.get("args", {}), "deployment_options": app.get("deployments", [])}
    if tasks:
        args["tasks"] = tasks
    http = {**cfg.get("http_options", {}), **({"port": port} if port else {})}
    return {"http_options": http, "name": app.get("name", "petl"), "route_prefix": app.get("route_prefix", "/"),
            "args": args}


PROXY_CALLBACK = ("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serve_apps.proxy_errors:middlewares")


def use_proxy_middleware() -> None:
    """A local cluster started after this inherits the env var that puts ``proxy_errors`` in Serve's
    HTTP proxy (a dead Ingress replica's requests: JSON 503 + Retry-After, not a plain 500)."""
    import os

    os.environ.setdefault(*PROXY_CALLBACK)


def run_local(path: str, tasks: list[str] | None = None, port: int | None = None, *, host: str | None = None,
              args_overrides: dict | None = None, quiet: bool = False) -> str:
    """The one Serve launcher (``petl serve``, ``petl demo``): deploy the config at ``path`` on the
    current (or a new local) Ray cluster; returns the base URL. ``tasks``, ``port`` and ``host``
    override the config's; ``args_overrides`` its app ``args`` (e.g. ``{"backbone": ...}``).
    Ray's own output (controller, proxy, replicas, the driver's Serve INFO lines) goes to the Ray
    session's log files, not the terminal: ``serving_logs_dir()`` says where. ``quiet``: those
    files too get WARNING and up only, and no access log (``petl demo``). The proxy's error
    middleware is set for a cluster started here (``use_proxy_middleware``)."""
    from petl_platform.cluster.connect import ensure_ray
    from petl_platform.cluster.trainer import release_idle_trainers

    c = load_config(path, tasks, port)
    http = {**c["http_options"], **({"host": host} if host else {})}
    use_proxy_middleware()
    ensure_ray(log_to_driver=False)
    release_idle_trainers()  # idle petl trainers' CPUs go to the replicas
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's own Serve INFO lines
    quiet_logs = {"logging_config": {"log_level": "WARNING", "enable_access_log": False}} if quiet else {}
    serve.start(http_options=http, **quiet_logs)
    serve.run(build_app({**c["args"], **(args_overrides or {})}), name=c["name"], route_prefix=c["route_prefix"])
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}"


def serving_logs_dir() -> str | None:
    """The Ray session's Serve log folder on this node (replicas, proxy, controller), or None."""
    import os

    import ray

    try:
        return os.path.join(ray._private.worker.global_worker.node.get_logs_dir_path(), "serve")
    except Exception:  # noqa: BLE001 - a private Ray API: the hint is optional
        return None
