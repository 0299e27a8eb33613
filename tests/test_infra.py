"""infra/ agrees with the code: env var names, service wiring, ports, image, the RayJob entrypoint. No docker."""

import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from petl_platform.tracking.settings import ENV_VARS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "infra" / "compose" / "docker-compose.yml"
DOCKERFILE = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
DOTENV = dict(line.split("=", 1) for line in (COMPOSE.parent / ".env.example").read_text().splitlines()
              if line.strip() and not line.startswith("#"))
VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")
SERVICES = yaml.safe_load(COMPOSE.read_text())["services"]
K8S = {d["kind"]: d for f in (ROOT / "infra" / "k8s").glob("*.yaml") for d in yaml.safe_load_all(f.read_text())
       if d and d["metadata"]["name"] != "petl-api-keys"}  # the MLflow/S3 Secret, not the API keys
CLUSTERS = {"RayCluster": K8S["RayCluster"]["spec"], "RayJob": K8S["RayJob"]["spec"]["rayClusterSpec"]}


def sub(value) -> str:
    """Compose interpolation with .env.example values: ${VAR:-default}, $$ -> $."""
    return VAR.sub(lambda m: DOTENV.get(m[1], m[2] or ""), str(value)).replace("$$", "$")


def env(service: str) -> dict[str, str]:
    return {k: sub(v) for k, v in SERVICES[service].get("environment", {}).items()}


def cmd(service: str) -> list[str]:  # commands are written as lists
    return [sub(a) for a in SERVICES[service]["command"]]


def flag(service: str, name: str) -> str:
    return (c := cmd(service))[c.index(name) + 1]


def ports(service: str) -> dict[int, int]:  # container port -> host port
    return {int(p.split(":")[-1]): int(p.split(":")[-2]) for p in map(str, SERVICES[service].get("ports", []))}


def test_compose_services_build_or_pull():
    assert {"minio", "minio-init", "postgres", "mlflow", "ray-head", "ray-worker"} <= set(SERVICES)
    for name, svc in SERVICES.items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            context = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert context == ROOT, name
            assert (context / svc["build"].get("dockerfile", "Dockerfile")).is_file(), name


def test_env_example_matches_compose_defaults():
    for var, default in VAR.findall(COMPOSE.read_text()):
        assert DOTENV.get(var) == default, var  # same stack with or without a copied .env


def test_compose_env_names_are_read_by_the_platform():
    for name in ("mlflow", "ray-head", "ray-worker"):
        assert set(env(name)) <= set(ENV_VARS) | {"MLFLOW_TRACKING_URI"}, name
    assert env("ray-head") == env("ray-worker")
    head = env("ray-head")
    assert (head["AWS_ACCESS_KEY_ID"], head["AWS_SECRET_ACCESS_KEY"]) == \
        (env("minio")["MINIO_ROOT_USER"], env("minio")["MINIO_ROOT_PASSWORD"])
    bucket = re.search(r"mc mb (?:--\S+ )*\w+/([\w.-]+)", " ".join(cmd("minio-init")))[1]
    assert urlparse(head["PETL_STORAGE_PATH"]).netloc == bucket
    assert urlparse(flag("mlflow", "--artifacts-destination")).netloc == bucket


def test_compose_urls_and_published_ports():
    tracking = urlparse(env("ray-head")["MLFLOW_TRACKING_URI"])
    assert (tracking.hostname, tracking.port) == ("mlflow", int(flag("mlflow", "--port"))) == ("mlflow", 5000)
    api_port = int(flag("minio", "--address").rsplit(":", 1)[1])
    for name in ("mlflow", "ray-head", "ray-worker"):
        s3 = urlparse(env(name)["MLFLOW_S3_ENDPOINT_URL"])
        assert (s3.hostname, s3.port) == ("minio", api_port) == ("minio", 9000), name
    for service, port in (("mlflow", 5000), ("minio", 9000), ("ray-head", 8265), ("ray-head", 6379)):
        assert ports(service).get(port) == port, (service, port)  # published on the same host port
    assert flag("ray-head", "--port") == "6379" and flag("ray-worker", "--address") == "ray-head:6379"


def test_mlflow_backend_store_is_the_postgres_service():
    uri = urlparse(flag("mlflow", "--backend-store-uri"))
    pg = env("postgres")
    assert uri.scheme.startswith("postgresql") and uri.hostname == "postgres" and uri.port == 5432
    assert (uri.username, uri.password, uri.path.lstrip("/")) == \
        (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"], pg["POSTGRES_DB"])


def test_dockerfile_matches_makefile_and_manifests():
    debs = re.search(r"^DEBS\s*:=(.*?)(?<!\\)\n", (ROOT / "Makefile").read_text(), re.M | re.S)[1]
    for pkg in debs.replace("\\", " ").split():
        assert re.search(rf"\s{re.escape(pkg)}\s", DOCKERFILE), pkg
    assert re.search(r"^WORKDIR /app$", DOCKERFILE, re.M) and re.search(r"PYTHONPATH=/app\b", DOCKERFILE)
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", DOCKERFILE, re.M)[1]
    for kind, spec in CLUSTERS.items():
        assert spec["rayVersion"] == ray_version, kind


def containers(spec: dict) -> list[dict]:  # head first, then the worker groups
    return [c for g in (spec["headGroupSpec"], *spec["workerGroupSpecs"]) for c in g["template"]["spec"]["containers"]]


def test_k8s_secret_and_clusters():
    secret = K8S["Secret"]
    assert secret["stringData"] and set(secret["stringData"]) <= set(ENV_VARS)
    for kind, spec in CLUSTERS.items():
        for c in containers(spec):
            refs = [e["secretRef"]["name"] for e in c.get("envFrom", []) if "secretRef" in e]
            assert secret["metadata"]["name"] in refs, (kind, c["name"])
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu", 0) for c in containers(spec)[1:]]
        assert max(gpus) >= 1 and min(gpus) == 0, kind  # a GPU group and a CPU group
        assert any(p["containerPort"] == 8265 for p in containers(spec)[0]["ports"]), kind


def test_rayjob_entrypoint_runs_petl_sweep():
    job = K8S["RayJob"]["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    python, dash_m, module, *flags = shlex.split(job["entrypoint"])
    assert (python, dash_m) == ("python", "-m")
    assert (ROOT / (module.replace(".", "/") + ".py")).is_file(), f"{module} is not a file in the repo"
    from petl_platform.cli import build_parser

    try:
        args = build_parser().parse_args(["sweep", *flags])
    except SystemExit:
        pytest.fail(f"`petl sweep` rejects {flags}")
    assert args.task == "digits-1k"


def test_rayjob_pythonpath_maps_to_the_repo():
    runtime_env = yaml.safe_load(K8S["RayJob"]["spec"]["runtimeEnvYAML"])
    local = []
    for p in runtime_env["env_vars"]["PYTHONPATH"].split(":"):
        assert p == "/app" or p.startswith("/app/"), p  # the image holds the repo at /app
        local.append(ROOT / p.removeprefix("/app").lstrip("/"))
        assert local[-1].is_dir(), p
    assert any((d / "jobs" / "__init__.py").is_file() for d in local)
    assert any((d / "petl_platform" / "__init__.py").is_file() for d in local)
