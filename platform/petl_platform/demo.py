"""``petl demo``: the main job with embedded defaults, end to end on one machine."""

from __future__ import annotations

import time

import torch

from .backbones import create_backbone
from .data import check_task_name, get_task, task_tensors
from .inference import MultiTaskPredictor
from .methods import get_method
from .training.run import finetune


def run_demo(tasks: list[str], methods: list[str], backbone: str, epochs: int | None = None,
             petl: list[str] = (), budget: float = 0.5, sweep: str | None = "dyn_lora", sweep_samples: int = 4,
             sweep_epochs: int = 3) -> list[dict]:
    """``methods`` on every task, then the ``petl`` methods on the first task (Dyn-* calibrated to
    ``budget``), then one multi-task call over every trained model with the trunk shared, then a
    small Ray Tune sweep of ``sweep`` on the first task, tracked in MLflow, champion registered."""
    for t in tasks:
        check_task_name(t)
    for m in [*methods, *petl]:
        get_method(m)
    t0 = time.time()
    bb = create_backbone(backbone)
    print(f"backbone {backbone} (fingerprint {bb.fingerprint}); tasks {', '.join(tasks)}; methods {', '.join(methods)}")
    rows, models = [], {}
    for task in tasks:
        for method in methods:
            overrides = {"epochs": epochs} if epochs else {}
            model, r = finetune(task, method, backbone, train_overrides=overrides, backbone_model=bb)
            rows.append(r)
            models[f"{task}/{method}"] = model
            print(f"  {task:20} {method:12} test acc {r['accuracy']:.3f}  ({r['wall_s']:.0f}s)", flush=True)
    for method in petl:
        dyn = method.startswith("dyn_")
        model, r = finetune(tasks[0], method, backbone, train_overrides={"epochs": epochs} if epochs else {}, backbone_model=bb,
                            budget=budget if dyn else None)
        rows.append(r)
        models[f"{tasks[0]}/{method}"] = model
        note = ""
        if dyn:
            d = r["dynamic_test"]
            note = f"; early exit at {budget:.0%} budget: acc {d['accuracy']:.3f} using {d['flops_fraction']:.0%} of the FLOPs"
        print(f"  {tasks[0]:20} {method:12} test acc {r['accuracy']:.3f}  ({r['wall_s']:.0f}s){note}", flush=True)
    print()
    print(f"{'task':20} {'method':12} {'test acc':>8} {'val acc':>8} {'trainable':>10} {'epochs':>6} {'wall s':>7}")
    for r in rows:
        print(f"{r['task']:20} {r['method']:12} {r['accuracy']:>8.3f} {r['val_accuracy']:>8.3f} "
              f"{r['trainable_params']:>10,} {r['epochs']:>6} {r['wall_s']:>7.1f}")
    _multi_task(bb, models, tasks[0])
    if sweep:
        from .cluster.connect import ray_session

        key = _serve_env()  # before the cluster starts: its replicas inherit the environment
        # one quiet local cluster for the sweep and Serve: Ray's own output stays in its log files
        with ray_session(log_to_driver=False) as started:
            _sweep(tasks[0], sweep, backbone, sweep_samples, sweep_epochs)
            for task in tasks[1:]:  # the linear probes join the sweep's champion in the registry
                _register(models[f"{task}/linear"], task,
                          next(r for r in rows if r["task"] == task and r["method"] == "linear"))
            _serve(tasks, backbone, 0.3, key, own_cluster=started is not None)
        if started is not None:
            print("  Serve and the local Ray cluster shut down")
    print(f"\ndemo finished in {time.time() - t0:.0f}s")
    _next_steps(tasks, methods, petl, sweep)
    return rows


def _next_steps(tasks: list[str], methods: list[str], petl: list[str], sweep: str | None) -> None:
    """What the demo did, where it went, and three commands to try next."""
    from .tracking.settings import TrackingSettings

    s = TrackingSettings.from_env()
    did = [f"trained {', '.join(methods)} on {len(tasks)} tasks" + (f" and {', '.join(petl)} on {tasks[0]}" if petl else ""),
           "answered every task in one call with the trunk shared"]
    if sweep:
        did += [f"swept {sweep} on {tasks[0]} with Ray Tune (every trial an MLflow run) and registered the champions",
                "served them with Ray Serve over HTTP, then shut it down"]
    print("\nWhat the demo did: " + "; ".join(did) + ".")
    if sweep:
        print(f"Runs and the registry are in {s.tracking_uri}; artifacts under {s.artifact_root}.")
    print("Next (after `source .venv/bin/activate`, or call .venv/bin/petl):")
    print("  petl registry list                               # the registered tasks and their aliases")
    print(f"  mlflow ui --backend-store-uri {s.tracking_uri}  # runs, metrics, plots")
    print(f"  petl train --task {tasks[0]} --method lora --register   # a challenger (README.md: Quickstart)")


def _multi_task(bb, models: dict, image_task: str) -> None:
    """Answer every trained task for a few images of one task, the frozen trunk computed once."""
    x, _ = task_tensors(get_task(image_task), bb)["test"]
    pred = MultiTaskPredictor(bb, models)
    logits = pred.predict(x[:4])
    stats = pred.last_stats
    print(f"\none call, {len(models)} tasks on 4 test images of {image_task}: {stats.blocks_run} blocks run "
          f"instead of {stats.blocks_independent} ({stats.block_ratio:.2f}x fewer; the trunk is shared by "
          f"{sum(1 for k in stats.tail_blocks if models[k].shared_prefix_blocks)} tasks)")
    for name, out in logits.items():
        classes = get_task(name.split("/")[0]).classes
        exits = stats.extra.get(name, {}).get("exit_stage")
        note = f"  exit stages {exits}" if exits else ""
        print(f"  {name:32} -> {[classes[i] for i in torch.argmax(out, -1).tolist()]}{note}")


def _sweep(task: str, method: str, backbone: str, samples: int, epochs: int) -> None:
    """A small ASHA sweep through Ray Tune on a local cluster, every trial an MLflow run."""
    from .tracking.runs import list_models
    from .tracking.settings import TrackingSettings
    from .training.space import default_space
    from .training.spec import SweepSpec, asha_rungs
    from .cluster.tune import run_sweep

    settings = TrackingSettings.from_env()
    rungs = asha_rungs(epochs)[2]
    print(f"\nRay Tune: {samples} trials of {method} on {task} (ASHA over {', '.join(default_space(method))}; "
          f"{epochs} epochs max, trials compared at epochs {', '.join(map(str, rungs))}), 2 at a time", flush=True)
    [s] = run_sweep(SweepSpec(tasks=(task,), method=method, backbone=backbone, settings=settings, samples=samples,
                              epochs=epochs, max_concurrent=2, name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
                              progress=False))
    for t in s["trials"]:
        params = ", ".join(f"{k}={v:.2g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items())
        status = "stopped by ASHA" if t["stopped_early"] else ("FAILED" if t["error"] else "completed")
        print(f"  {params:56} val acc {t['val_accuracy'] or float('nan'):.3f} after {t['epochs']} epoch(s), {status}")
    print(f"  {s['trial_epochs']} trial-epochs used of the {s['grid_epochs']} a full run of every trial would take")
    r = s["registered"]
    print(f"  best val acc {s['best']['val_accuracy']:.3f}: registered as models:/{r['name']}@{r['alias']} (version {r['version']})")
    print(f"  registry: {[(m['name'], m['aliases']) for m in list_models(settings)]}")
    print(f"  MLflow UI: mlflow ui --backend-store-uri {settings.tracking_uri}")


def _register(model, task: str, result: dict) -> None:
    from .tracking.runs import log_and_register
    from .tracking.settings import TrackingSettings

    mv = log_and_register(TrackingSettings.from_env(), model, task, get_task(task).classes,
                          run_name=f"demo {task} {model.method}",
                          metrics={"val_accuracy": result["val_accuracy"], "test_accuracy": result["accuracy"]})
    print(f"  registered {task} ({model.method}) as models:/{task}@champion (version {mv.version})")


def _serve_env() -> str:
    """A one-off API key for the demo's requests, and the proxy's error middleware; both are read
    from the environment by the cluster's processes, so this runs before the cluster starts."""
    import os
    import secrets

    from serve_apps.petl_app import use_proxy_middleware

    key = f"demo-{secrets.token_hex(8)}"
    os.environ["PETL_API_KEYS"] = f"{key}=*"
    use_proxy_middleware()
    return key


def _serve(tasks: list[str], backbone: str, budget: float, key: str, own_cluster: bool = False) -> None:
    """Serve the registered champions with Ray Serve on the caller's Ray session (``run_demo``'s
    ``ray_session``, which ends a cluster of its own and Serve with it), send real requests over
    HTTP; on a cluster it joined (``own_cluster`` False), remove the Serve app afterwards."""
    import base64
    import io

    import httpx
    from PIL import Image
    from ray import serve

    from serve_apps import LOCAL_CONFIG
    from serve_apps.petl_app import run_local

    print(f"\nRay Serve: serving {', '.join(tasks)} from the registry (alias champion) on one shared backbone")
    try:
        # replicas, proxy and controller log to files under the Ray session, at WARNING, no access log
        url = run_local(LOCAL_CONFIG, tasks, host="127.0.0.1", args_overrides={"backbone": backbone}, quiet=True)
        image = get_task(tasks[0]).splits["test"][0][0]
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="PNG")
        body = {"image": base64.b64encode(buf.getvalue()).decode(), "tasks": tasks}
        with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as c:
            for label, extra in (("exits as trained", {}), (f"budget {budget:.0%}", {"budget": budget})):
                r = c.post("/v1/predict", json={**body, **extra}).raise_for_status().json()
                print(f"  POST {url}/v1/predict, one {tasks[0]} test image, {len(tasks)} tasks, {label}: "
                      f"{r['latency_ms']:.0f} ms")
                for t, a in r["results"].items():
                    stage = f"exit stage {a['exit_stage']}, " if a["exit_stage"] else ""
                    print(f"    {t:18} {a['method']:9} v{a['version']}: {a['label']:>6} "
                          f"(p={a['top_k'][0]['probability']:.2f}; {stage}{a['compute']['gflops'] * 1e3:.1f} MFLOPs)")
            bad = c.post("/v1/predict", json={**body, "tasks": ["no-such-task"]})
            print(f"  an unknown task -> HTTP {bad.status_code}: {bad.json()['detail'][:70]}...")
    finally:
        # On a cluster of our own, ray.shutdown() ends Serve with it: serve.shutdown() first only adds
        # Ray's "Task ServeController.graceful_shutdown failed ... will be retried" warning (the
        # controller kills itself while the driver's call to it waits).
        if not own_cluster:
            serve.shutdown()
