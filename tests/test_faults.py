"""Fault suite (slow; CI): a multi-node Ray cluster on this machine (a head with no CPUs and two
1-CPU workers, all on 127.0.0.1), MLflow on SQLite, S3 on moto, the tiny backbone.

- node loss during a sweep: the node running a trial is removed; the trial resumes from its last
  checkpoint on the other node, losing at most one epoch;
- replica kill under bounded load: serve_apps/configs/production.yaml (2 replicas of every
  deployment; only num_cpus is lowered to fit 2 cores), 8 clients, one replica of each deployment
  killed in turn, the Ingress included: only requests in flight fail, each a 503 with Retry-After
  and a JSON body, no request sent once the kill is detected fails or stalls, and the figures record
  the wait against the 2x-normal-p99 goal;
- node loss while serving: a worker holding replicas is removed; serving resumes on the rest.

Each test writes its figures to ``$PETL_FAULTS_OUT/faults_<test>.json`` (default: the temp dir)
and prints them."""

from __future__ import annotations

import base64
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from platform_stack import free_port, platform_stack
from test_serving import KEY, _png, _register

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
# one task per serving role: trunk, adapters, early exit (dyn_linear trains fastest), token dispatch
TASKS = {"digits-1k": "linear", "dsprites_loc-1k": "adapter", "norb_azimuth-1k": "dyn_linear", "clevr_count-1k": "dyt"}
DEPLOYMENTS = ("TrunkBackbone", "TaskAdapters", "EarlyExitRouter", "TokenDispatchRouter", "Ingress")
CLIENTS, THINK_S = 8, 0.5  # bounded load: 8 closed-loop clients, each pausing between requests
STALL_S = 15.0  # a request waiting this long is stuck behind a dead replica, not slow
# Find a dead raylet in ~3 s rather than Ray's default ~30 s (the GCS health-checks every node).
FAST_NODE_FAILURE = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000,
                     "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


def _figures(name: str, figures: dict) -> None:
    out = Path(os.environ.get("PETL_FAULTS_OUT") or tempfile.gettempdir())
    out.mkdir(parents=True, exist_ok=True)
    (out / f"faults_{name}.json").write_text(json.dumps(figures, indent=2))
    print(f"\n[faults] {name}: {json.dumps(figures)}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    from petl_platform import create_backbone

    with platform_stack(tmp_path_factory.mktemp("faults")) as st:
        os.environ["PETL_API_KEYS"] = f"{KEY}=*"
        # read by each node's Serve proxy: a request whose Ingress replica died gets a JSON 503
        os.environ["RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"] = "serve_apps.proxy_errors:middlewares"
        bb = create_backbone(st["backbone"])
        for task, method in TASKS.items():
            _register(st["settings"], bb, task, method)
        c = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "gcs_server_port": free_port(), "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(), "_system_config": FAST_NODE_FAILURE})
        for _ in range(2):
            c.add_node(num_cpus=1)
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level=logging.WARNING)
        try:
            yield {**st, "cluster": c, "add_worker": lambda: c.add_node(num_cpus=1)}
        finally:
            from ray import serve

            serve.shutdown()
            ray.shutdown()
            c.shutdown()


def _node_of_pid(pid: int) -> str | None:
    from ray.util.state import list_workers

    return next((w.node_id for w in list_workers(filters=[("pid", "=", pid)], limit=10)), None)


def _cluster_node(cluster, node_id: str):
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


# ------------------------------------------------------------------------------- node loss: sweep
def test_node_loss_during_sweep_resumes_trial_from_checkpoint(cluster):
    from petl_platform.training.spec import SweepSpec
    from petl_platform.cluster.tune import run_sweep

    st, c, seen = cluster, mlflow.MlflowClient(cluster["settings"].tracking_uri), {}
    # LoRA, not the linear probe: the probe trains on cached trunk features, so its epochs take
    # milliseconds and the trial can finish before the node is removed; a LoRA epoch takes seconds
    epochs, sweep = 4, "nodeloss-digits-1k"

    def remove_trial_node_after_a_checkpoint():
        deadline = time.time() + 240
        while time.time() < deadline and "node" not in seen:
            exp = c.get_experiment_by_name("petl")
            runs = c.search_runs([exp.experiment_id], f"tags.`petl.sweep` = '{sweep}' and metrics.val_accuracy >= 0") \
                if exp else []
            ckpts = list(Path(st["settings"].storage_path, sweep).glob("*/checkpoint_0000*"))
            if runs and ckpts and "petl.worker_pid" in runs[0].data.tags:
                pid = int(runs[0].data.tags["petl.worker_pid"])
                node_id = _node_of_pid(pid)
                if node_id is None:  # the State API has not listed the worker yet: look again
                    time.sleep(0.2)
                    continue
                seen.update(pid=pid, run_id=runs[0].info.run_id, node=node_id, t=time.time(),
                            epoch_at_removal=len(c.get_metric_history(runs[0].info.run_id, "val_accuracy")))
                st["cluster"].remove_node(_cluster_node(st["cluster"], node_id), allow_graceful=False)
            time.sleep(0.2)

    killer = threading.Thread(target=remove_trial_node_after_a_checkpoint, daemon=True)
    killer.start()
    t0 = time.time()
    try:
        [s] = run_sweep(SweepSpec(tasks=("digits-1k",), method="lora", backbone=st["backbone"], settings=st["settings"],
                                  space=("lr=choice(0.01)", "rank=choice(2)"), samples=1, epochs=epochs,
                                  scheduler="fifo", train={"batch_size": 16}, max_failures=3, name="nodeloss",
                                  register=False, progress=False))
    finally:
        killer.join(5)
        st["add_worker"]()  # the replacement node the next tests expect (an autoscaler's job)
    assert "node" in seen, "the trial never checkpointed"
    [t] = s["trials"]
    assert t["run_id"] == seen["run_id"], t
    run = c.get_run(t["run_id"])
    history = c.get_metric_history(t["run_id"], "val_accuracy")
    resumed_from = int(run.data.tags.get("petl.resumed_from_epoch", -1))
    new_pid = int(run.data.tags["petl.worker_pid"])
    figures = {"epochs": epochs, "epoch_at_removal": seen["epoch_at_removal"], "resumed_from_epoch": resumed_from,
               "epochs_lost": len(history) - epochs, "removed_node": seen["node"][:8], "resumed_on_node": (_node_of_pid(new_pid) or "")[:8],
               "sweep_wall_s": round(time.time() - t0, 1), "trial_error": t["error"]}
    _figures("node_loss_during_sweep", figures)
    assert t["error"] is None and t["epochs"] == epochs and t["run_id"] == seen["run_id"]
    assert run.info.status == "FINISHED"
    assert resumed_from >= 1 and new_pid != seen["pid"]  # resumed from a checkpoint, not from scratch
    assert figures["epochs_lost"] <= 1, figures
    assert {m.step for m in history} == set(range(1, epochs + 1))


# ------------------------------------------------------------------------------------ serving
class Load:
    """``CLIENTS`` closed-loop clients, each sending one 4-task predict then pausing ``THINK_S``.
    Records (start, end, status, retry_after, json_body) per request, times on time.monotonic()."""

    def __init__(self, url: str, max_requests: int = 20_000):
        body = {"image": base64.b64encode(_png()).decode(), "tasks": list(TASKS)}
        self.url, self.body, self.max_requests = url, body, max_requests
        self.records: list[tuple] = []
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(CLIENTS)]

    def _client(self):
        import httpx

        with httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
            while not self.stop_event.is_set() and len(self.records) < self.max_requests:
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/predict", json=self.body)
                    try:
                        r.json()
                        is_json = True
                    except ValueError:
                        is_json = False
                    rec = (t0, time.monotonic(), r.status_code, r.headers.get("retry-after"), is_json, r.text[:200])
                except httpx.HTTPError as e:  # no HTTP answer at all (connection reset, ...)
                    rec = (t0, time.monotonic(), type(e).__name__, None, False, str(e)[:200])
                self.records.append(rec)
                time.sleep(THINK_S)

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        for t in self.threads:
            t.join(70)

    def between(self, t0: float, t1: float = float("inf")) -> list[tuple]:
        return [r for r in list(self.records) if t0 <= r[0] < t1]


def _p99(records) -> float:
    lat = sorted(r[1] - r[0] for r in records)
    return lat[min(len(lat) - 1, int(0.99 * len(lat)))]


def _replicas(deployment: str | None = None) -> list:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
    prefix = f"ServeReplica:petl:{deployment}" if deployment else "ServeReplica:petl:"
    return [a for a in actors if a.class_name == prefix or (deployment is None and a.class_name.startswith(prefix))]


def _states() -> dict[str, dict]:
    from ray import serve

    return {d: dict(s.replica_states) for d, s in serve.status().applications["petl"].deployments.items()}


def _healthy(states: dict, replicas: int = 2) -> bool:
    return all(s == {"RUNNING": replicas} for s in states.values())


def _wait(pred, timeout: float, poll: float = 0.2) -> float | None:
    """monotonic time at which ``pred()`` first held, None on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.monotonic()
        time.sleep(poll)
    return None


@pytest.fixture(scope="module")
def serving(cluster):
    """production.yaml on the cluster; only each replica's num_cpus is set to 0 to fit 2 cores."""
    from ray import serve

    from serve_apps.petl_app import build_app

    cfg = yaml.safe_load((ROOT / "serve_apps" / "configs" / "production.yaml").read_text())
    app = cfg["applications"][0]
    opts = [{**d, "ray_actor_options": {**d.get("ray_actor_options", {}), "num_cpus": 0}} for d in app["deployments"]]
    port, t0 = free_port(), time.monotonic()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({**app["args"], "tasks": list(TASKS), "backbone": cluster["backbone"], "refresh_s": 30,
                         "deployment_options": opts}), name="petl", route_prefix="/")
    assert _wait(lambda: _healthy(_states()), 120), _states()
    print(f"\n[faults] production.yaml deployed (10 replicas) in {time.monotonic() - t0:.1f} s")
    return {**cluster, "url": f"http://127.0.0.1:{port}"}


def _warm_up(load: Load, timeout: float = 180) -> float:
    """Until 3 rounds of requests in a row are 200 and steady (max <= 3x median): each replica's
    first requests load adapters from the registry (and calibrate early exits), not normal latency."""
    t0, n = time.monotonic(), 3 * CLIENTS

    def steady():
        done = sorted(load.records, key=lambda r: r[1])[-n:]
        lat = sorted(r[1] - r[0] for r in done)
        return len(done) == n and all(r[2] == 200 for r in done) and lat[-1] <= 3 * lat[n // 2]

    assert _wait(steady, timeout, poll=0.5), _summary(load.records)
    return time.monotonic() - t0


def _failures_ok(failed: list[tuple]) -> bool:
    return all(r[2] == 503 and r[3] is not None and r[4] for r in failed)


def _summary(records) -> dict:
    statuses: dict[str, int] = {}
    for r in records:
        statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
    return statuses


def _window(load: Load, t_fault: float, t_detect: float | None, t_end: float) -> dict:
    """Figures of the requests around one fault: those that ended after it and started before t_end."""
    window = [r for r in load.between(0, t_end) if r[1] > t_fault]
    failed = [r for r in window if r[2] != 200]
    after = load.between(t_detect or t_end, t_end)
    return {"requests": len(window), "failed": len(failed), "statuses": _summary(window),
            "in_flight_at_fault": sum(1 for r in load.records if r[0] <= t_fault < r[1]), "in_flight_bound": CLIENTS,
            # Until the loss is detected, Serve's routers still send requests to the lost replicas:
            # those are in flight on them too (a request sent after detection must never fail).
            "in_flight_until_detect": sum(1 for r in load.records if r[0] < (t_detect or t_end) and r[1] > t_fault),
            "failures_503_retry_after_json": _failures_ok(failed),
            "failure_samples": sorted({f"{r[2]} retry-after={r[3]} json={r[4]} {r[5][:80]}" for r in failed})[:3],
            "failed_started_after_detect": sum(1 for r in after if r[2] != 200),
            "detect_s": round(t_detect - t_fault, 2) if t_detect else None,
            "max_wait_after_detect_s": round(max((r[1] - r[0] for r in after), default=0), 3),
            "p99_after_detect_s": round(_p99(after), 3) if after else None}


def _baseline(load: Load, seconds: float) -> dict:
    warm_s = _warm_up(load)
    t0 = time.monotonic()
    time.sleep(seconds)
    base = [r for r in load.between(t0) if r[1] <= time.monotonic()]
    assert base and all(r[2] == 200 for r in base), _summary(base)
    lat = sorted(r[1] - r[0] for r in base)
    return {"warm_up_s": round(warm_s, 1), "requests": len(base), "req_per_s": round(len(base) / seconds, 1),
            "p50_s": round(lat[len(lat) // 2], 3), "p99_s": round(_p99(base), 3)}


def test_replica_kill_under_bounded_load(serving):
    """Kill one replica of each deployment in turn (8 s of load after each kill is detected), then
    wait for every deployment to be back at 2 replicas."""
    import ray

    rows, head = [], serving["cluster"].head_node.node_id
    with Load(serving["url"]) as load:
        baseline = _baseline(load, 8)
        for dep in DEPLOYMENTS:
            # Serve's proxy (HeadOnly here) prefers the Ingress replica on its own node: kill that one
            victim = max(_replicas(dep), key=lambda a: a.node_id == head)
            t_kill = time.monotonic()
            ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
            t_detect = _wait(lambda: _states()[dep] != {"RUNNING": 2}, 30)
            time.sleep(8)
            rows.append({"deployment": dep, **_window(load, t_kill, t_detect, time.monotonic())})
    t_last = time.monotonic()  # load stopped: the 5 replacements start faster on 2 cores
    t_back = _wait(lambda: _healthy(_states()), 180, poll=1)
    figures = {"clients": CLIENTS, "think_s": THINK_S, "baseline": baseline, "kills": rows,
               "all_back_to_2_replicas_s_after_load_stopped": round(t_back - t_last, 1) if t_back else None}
    # The goal (2x the normal p99 once the kill is detected) is a performance figure: it is recorded
    # here and in the report, not asserted, since on 2 shared cores a replacement replica's start-up
    # competes with the load. The test asserts what must never happen: a request that stalls.
    figures["waits_over_2x_p99"] = [(r["deployment"], r["max_wait_after_detect_s"]) for r in rows
                                    if r["max_wait_after_detect_s"] > 2 * baseline["p99_s"]]
    _figures("replica_kill", figures)
    for row in rows:
        assert row["detect_s"] is not None, row
        assert row["failed"] <= row["in_flight_until_detect"] and row["failed_started_after_detect"] == 0, row
        assert row["failures_503_retry_after_json"], row
    assert t_back is not None, _states()
    stalled = [(r["deployment"], r["max_wait_after_detect_s"]) for r in rows if r["max_wait_after_detect_s"] > STALL_S]
    assert not stalled, f"requests sent after the kill was detected stalled over {STALL_S} s: {stalled}"


def test_node_loss_while_serving(serving):
    """Remove the worker node that holds the most replicas: only requests in flight fail, and the
    requests sent once the loss is detected are served by the replicas on the remaining nodes."""
    c = serving["cluster"]
    assert _wait(lambda: _healthy(_states()), 120), _states()
    workers = {n.node_id: n for n in c.worker_nodes}
    per_node: dict[str, list[str]] = {}
    for a in _replicas():
        if a.node_id in workers:
            per_node.setdefault(a.node_id, []).append(a.class_name.rsplit(":", 1)[-1])
    assert per_node, "no replica on a worker node"
    node_id, lost = max(per_node.items(), key=lambda kv: len(kv[1]))
    with Load(serving["url"]) as load:
        baseline = _baseline(load, 5)
        t_kill = time.monotonic()
        c.remove_node(workers[node_id], allow_graceful=False)
        t_detect = _wait(lambda: not _healthy(_states()), 30)
        least: dict[str, int] = {}  # fewest RUNNING replicas of each deployment seen in the 10 s after
        t_end = time.monotonic() + 10
        while time.monotonic() < t_end:
            for d, s in _states().items():
                least[d] = min(least.get(d, 2), s.get("RUNNING", 0))
            time.sleep(0.5)
        row = _window(load, t_kill, t_detect, time.monotonic())
    figures = {"clients": CLIENTS, "think_s": THINK_S, "baseline": baseline, "removed_node": node_id[:8],
               "replicas_lost": sorted(lost), **row, "fewest_running_after_detect": least}
    _figures("node_loss_while_serving", figures)
    assert row["detect_s"] is not None and min(least.values()) >= 1, figures  # never a deployment without one
    assert node_id not in {a.node_id for a in _replicas()}
    assert row["failed"] <= row["in_flight_until_detect"] and row["failed_started_after_detect"] == 0, figures
    assert row["requests"] > row["in_flight_at_fault"] and row["p99_after_detect_s"] is not None, figures  # served on
    assert row["failures_503_retry_after_json"], figures
