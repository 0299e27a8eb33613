"""infra/k8s/rayservice.yaml agrees with serve_apps (config, app module), the Dockerfile and the manifests."""

import importlib
import inspect
import json
import re
from pathlib import Path, PurePosixPath

import yaml
from ray.serve import Deployment

import serve_apps.petl_app as petl_app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [d for f in sorted((ROOT / "infra" / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d]
SECRETS = {d["metadata"]["name"]: d for d in DOCS if d["kind"] == "Secret"}
SERVICE = next(d["spec"] for d in DOCS if d["kind"] == "RayService" and d["metadata"]["name"] == "petl-serve")
CLUSTER = SERVICE["rayClusterConfig"]
IN_CLUSTER = yaml.safe_load(SERVICE["serveConfigV2"])
LOCAL = yaml.safe_load((ROOT / "serve_apps" / "configs" / "local.yaml").read_text())
PRODUCTION = yaml.safe_load((ROOT / "serve_apps" / "configs" / "production.yaml").read_text())
GPU = yaml.safe_load((ROOT / "serve_apps" / "configs" / "gpu.yaml").read_text())
CONFIGS = {"rayservice.yaml": IN_CLUSTER, "local.yaml": LOCAL, "production.yaml": PRODUCTION, "gpu.yaml": GPU}
DOCKERFILE = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
GROUPS = (CLUSTER["headGroupSpec"], *CLUSTER["workerGroupSpecs"])
HOLD_BACKBONE = {"TrunkBackbone", "TaskAdapters", "EarlyExitRouter", "TokenDispatchRouter"}
CONTAINERS = [(g, c) for g in GROUPS for c in g["template"]["spec"]["containers"]]  # (group, container), head first


def apps(cfg: dict) -> dict[str, dict]:
    return {a["name"]: a for a in cfg["applications"]}


def deployments(cfg: dict) -> dict[tuple[str, str], dict]:  # (app, deployment) -> options
    return {(a, d["name"]): d for a, app in apps(cfg).items() for d in app["deployments"]}


def walk(node):  # every dict in a parsed YAML tree
    if isinstance(node, dict):
        yield node
    for v in node.values() if isinstance(node, dict) else node if isinstance(node, list) else ():
        yield from walk(v)


def test_same_applications_whose_import_paths_resolve():
    assert set(apps(IN_CLUSTER)) == set(apps(GPU)) == set(apps(LOCAL))
    assert {a["import_path"] for a in IN_CLUSTER["applications"]} == {a["import_path"] for a in LOCAL["applications"]}
    for name, app in apps(IN_CLUSTER).items():
        module, attr = app["import_path"].split(":")
        assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), module
        assert callable(getattr(importlib.import_module(module), attr, None)), app["import_path"]
        args, gpu_args = dict(app["args"]), dict(apps(GPU)[name]["args"])
        assert args.pop("tasks") and gpu_args.pop("tasks"), name  # both serve some task
        assert args == gpu_args, name  # the GPU config: only `tasks` may differ


def _gpus(d: dict) -> float:
    return (d.get("ray_actor_options") or {}).get("num_gpus", 0)


def _cpus(quantity) -> float:  # a Kubernetes CPU quantity: "8", 8 or "500m"
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def test_rayservice_serves_on_gpus_like_gpu_yaml():
    """The in-cluster config is gpu.yaml's: the four deployments that hold the frozen backbone ask
    a GPU fraction, the Ingress none, bf16, and a GPU worker group that can hold them all."""
    assert set(deployments(IN_CLUSTER)) == set(deployments(GPU))
    for key, d in deployments(IN_CLUSTER).items():
        assert _gpus(d) == _gpus(deployments(GPU)[key]), key
        assert d["ray_actor_options"] == deployments(GPU)[key]["ray_actor_options"], key
        assert (_gpus(d) > 0) == (key[1] in HOLD_BACKBONE), (key, _gpus(d))  # the Ingress: no GPU
        assert _gpus(d) <= 1, key  # at most one device; fractions let several replicas share it
    for name, app in apps(IN_CLUSTER).items():
        assert app["args"].get("dtype") == apps(GPU)[name]["args"].get("dtype") == "bf16", name
    groups = [g for g in CLUSTER["workerGroupSpecs"]
              if any(c["resources"]["limits"].get("nvidia.com/gpu", 0) for c in g["template"]["spec"]["containers"])]
    assert len(groups) == 1 and len(CLUSTER["workerGroupSpecs"]) == 2, "one GPU group beside the CPU group"
    (c,) = groups[0]["template"]["spec"]["containers"]
    per_pod = c["resources"]["limits"]["nvidia.com/gpu"]
    assert per_pod >= 1 and c["resources"]["requests"]["nvidia.com/gpu"] == per_pod
    assert str(groups[0]["rayStartParams"].get("num-gpus", per_pod)) == str(per_pod)
    on_gpu = [d for k, d in deployments(IN_CLUSTER).items() if _gpus(d) > 0]
    fraction = min(_gpus(d) for d in on_gpu)  # as many replicas per pod as its GPUs hold need their CPUs
    assert _cpus(c["resources"]["limits"]["cpu"]) >= per_pod / fraction * max(d["ray_actor_options"]["num_cpus"]
                                                                             for d in on_gpu)
    most = sum(_gpus(d) * d["autoscaling_config"]["max_replicas"] for d in on_gpu)  # every deployment at its max
    assert groups[0]["maxReplicas"] * per_pod >= most, (groups[0]["maxReplicas"], most)


def test_gpu_and_cpu_configs_are_the_same_app():
    """gpu.yaml = local.yaml + dtype (and GPU-only settings) + GPU fractions: a CPU-only cluster
    runs the same code and deployments (local.yaml or production.yaml, tested above)."""
    for name, app in apps(GPU).items():
        args, cpu_args = dict(app["args"]), dict(apps(LOCAL)[name]["args"])
        assert args["dtype"] and "dtype" not in cpu_args, name  # CPU replicas infer in fp32
        assert cpu_args.items() <= args.items(), name  # GPU-only settings may be added, none changed
    assert set(deployments(GPU)) == set(deployments(LOCAL))
    for key, d in deployments(GPU).items():
        cpu = deployments(LOCAL)[key]
        assert _gpus(cpu) == 0, key
        assert {k: v for k, v in d.items() if k != "ray_actor_options"} == \
            {k: v for k, v in cpu.items() if k != "ray_actor_options"}, key


def test_deployment_names_are_the_deployments_of_the_module():
    defined = {v.name for v in vars(petl_app).values() if isinstance(v, Deployment)}
    for name in defined:
        assert getattr(petl_app, name).name == name  # Ingress = serve.deployment(name="Ingress")(...)
    for file, cfg in CONFIGS.items():
        for app in cfg["applications"]:
            assert {d["name"] for d in app["deployments"]} == defined, (file, app["name"])


def test_autoscaling_is_sane_and_identical():
    assert set(deployments(IN_CLUSTER)) == set(deployments(LOCAL))
    for file, cfg in CONFIGS.items():
        for key, d in deployments(cfg).items():
            auto = d.get("autoscaling_config") or {}
            assert 0 <= auto.get("min_replicas", -1) <= auto.get("max_replicas", -2), (file, key)
            assert auto.get("target_ongoing_requests", 0) > 0, (file, key)
    for key, d in deployments(IN_CLUSTER).items():
        assert d["autoscaling_config"] == deployments(LOCAL)[key]["autoscaling_config"], key


def test_user_config_keys_are_read_by_reconfigure():
    source = inspect.getsource(petl_app._Replica.reconfigure)
    for file, cfg in CONFIGS.items():  # local.yaml, and the copy in rayservice.yaml
        keys = {k for d in deployments(cfg).values() for k in d.get("user_config") or {}}
        assert keys, file
        for k in keys:
            assert re.search(rf"""["']{re.escape(k)}["']""", source), (file, k)


def test_http_options_runtime_env_and_image():
    http = IN_CLUSTER["http_options"]
    assert http["host"] == "0.0.0.0"  # reachable through the serve Service, not only from the pod
    assert any(p["containerPort"] == http.get("port", 8000) == 8000 for p in CONTAINERS[0][1]["ports"])  # head
    assert re.search(r"^WORKDIR /app$", DOCKERFILE, re.M) and re.search(r"^COPY \. \.$", DOCKERFILE, re.M)
    for app in IN_CLUSTER["applications"]:
        assert app["runtime_env"]["env_vars"]["PYTHONPATH"] == "/app", app["name"]  # the repo root in the image
    assert CLUSTER["rayVersion"] == re.search(r"^ARG RAY_VERSION=(\S+)", DOCKERFILE, re.M)[1]
    gpus = [c["resources"]["limits"].get("nvidia.com/gpu", 0) for _, c in CONTAINERS[1:]]
    assert max(gpus) >= 1 and min(gpus) == 0  # a GPU group and a CPU group


def test_secret_refs_and_api_keys_mount():
    for group, c in CONTAINERS:
        volumes = {v["name"]: v for v in group["template"]["spec"].get("volumes", [])}
        refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
        refs += [e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})]
        refs += [v["secret"]["secretName"] for v in volumes.values() if "secret" in v]
        assert "petl-mlflow-s3" in refs and set(refs) <= set(SECRETS), (c["name"], refs)
        path = PurePosixPath(next(e["value"] for e in c["env"] if e["name"] == "PETL_API_KEYS_FILE"))
        mount = next((m for m in c.get("volumeMounts", []) if path.is_relative_to(m["mountPath"])), None)
        assert mount is not None, (c["name"], str(path))
        secret = SECRETS[volumes[mount["name"]]["secret"]["secretName"]]
        file = str(path.relative_to(mount["mountPath"]))  # the key of the Secret that becomes the file
        assert secret["metadata"]["name"] == "petl-api-keys" and file in secret["stringData"], (c["name"], file)
        keys = json.loads(secret["stringData"][file])  # shipped empty: no usable key (test_infra.py)
        assert isinstance(keys, dict) and all(v == "*" or isinstance(v, list) for v in keys.values())


def test_token_auth_stays_on():
    assert CLUSTER["authOptions"]["mode"] == "token"
    for node in walk([*DOCS, IN_CLUSTER]):
        assert str(node.get("RAY_AUTH_MODE", "")).lower() != "disabled", node
        assert not (node.get("name") == "RAY_AUTH_MODE" and str(node.get("value")).lower() == "disabled"), node
        assert str((node.get("authOptions") or {}).get("mode", "")).lower() != "disabled", node
    for f in (p for p in (ROOT / "infra").rglob("*") if p.is_file()):
        assert not re.search(r"RAY_AUTH_MODE\W+(?:value\W+)?disabled", f.read_text(errors="ignore"), re.I), f


def test_configs_pass_serves_own_schema():
    from ray.serve.schema import DeploymentSchema, ServeDeploySchema

    for file, cfg in CONFIGS.items():
        ServeDeploySchema.model_validate(cfg)  # raises on a bad value
        for key, d in deployments(cfg).items():  # DeploymentSchema ignores unknown keys: a typo would be lost
            assert set(d) <= set(DeploymentSchema.model_fields), (file, key, set(d) - set(DeploymentSchema.model_fields))


def test_production_config_survives_one_replica_loss():
    """production.yaml: the local app with >= 2 replicas of every deployment (the Ingress too), one
    per node, a fast health check, a bounded drain, and Retry-After on backpressure 503s."""
    assert {a["import_path"] for a in PRODUCTION["applications"]} == {a["import_path"] for a in LOCAL["applications"]}
    for name, app in apps(PRODUCTION).items():
        args, local_args = dict(app["args"]), dict(apps(LOCAL)[name]["args"])
        assert args.pop("tasks") and local_args.pop("tasks") and args == local_args, name
    for key, d in deployments(PRODUCTION).items():
        auto = d.get("autoscaling_config")
        replicas = auto["min_replicas"] if auto else d.get("num_replicas", 1)
        assert isinstance(replicas, int) and replicas >= 2, (key, replicas)
        assert d["max_replicas_per_node"] == 1, key  # a node loss costs at most one replica of each
        assert 0 < d["health_check_period_s"] <= 5 and d["health_check_timeout_s"] <= 15, key
        assert d["graceful_shutdown_timeout_s"] <= 30, key
        assert d["max_queued_requests"] > 0 and d["backpressure_config"]["retry_after_s"] > 0, key


def test_proxy_middleware_answers_json_503_when_the_ingress_replica_died():
    """serve_apps/proxy_errors.py: Serve's proxy writes nothing when the Ingress replica died
    mid-request (uvicorn would then send a text/plain 500); the middleware sends a JSON 503 with
    Retry-After, and leaves every response the app did write alone."""
    import asyncio

    from serve_apps.proxy_errors import NoResponseAs503, middlewares

    async def died(scope, receive, send):  # what the proxy does on RayActorError: no message at all
        return None

    async def answered(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": []})
        await send({"type": "http.response.body", "body": b"app error"})

    def run(app):
        sent = []

        async def send(message):
            sent.append(message)

        asyncio.run(NoResponseAs503(app)({"type": "http", "path": "/v1/predict"}, None, send))
        return sent

    start, body = run(died)
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"retry-after"] == b"1"
    assert headers[b"content-type"] == b"application/json" and "retry" in json.loads(body["body"])["detail"]
    assert [m.get("status") for m in run(answered)] == [500, None]  # untouched
    assert [m.cls for m in middlewares()] == [NoResponseAs503]
