"""infra/ agrees with the code: env var names, service wiring, ports, image, the RayJob entrypoint. No docker."""

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from petl_platform.tracking.settings import ENV_VARS, SECRET_ENV_VARS

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "infra" / "compose" / "docker-compose.yml"
DOCKERFILE = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
DOTENV = dict(line.split("=", 1) for line in (COMPOSE.parent / ".env.example").read_text().splitlines()
              if line.strip() and not line.startswith("#"))
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?message}, ${VAR?message}
VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
FILLED = {k: v or f"test-{k.lower()}" for k, v in DOTENV.items()}  # a .env with the secrets filled in
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY\b|KEY_ID", re.I)
SERVICES = yaml.safe_load(COMPOSE.read_text())["services"]
COMPOSE_TEXT = "\n".join(ln for ln in COMPOSE.read_text().splitlines() if not ln.lstrip().startswith("#"))
K8S = {d["kind"]: d for f in (ROOT / "infra" / "k8s").glob("*.yaml") for d in yaml.safe_load_all(f.read_text())
       if d and d["metadata"]["name"] != "petl-api-keys"}  # the MLflow/S3 Secret, not the API keys
CLUSTERS = {"RayCluster": K8S["RayCluster"]["spec"], "RayJob": K8S["RayJob"]["spec"]["rayClusterSpec"],
            "RayService": K8S["RayService"]["spec"]["rayClusterConfig"]}


def sub(value) -> str:
    """Compose interpolation with a filled-in .env.example: ${VAR:-default}, ${VAR:?msg}, $$ -> $."""
    return VAR.sub(lambda m: FILLED.get(m[1], m[3] if m[2] in (":-", "-") else ""), str(value)).replace("$$", "$")


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
    for var, op, default in VAR.findall(COMPOSE_TEXT):
        assert var in DOTENV, f"{var} is not in .env.example"
        if op in (":-", "-"):
            assert DOTENV[var] == default, var  # same setting with or without a copied .env


def test_compose_env_names_are_read_by_the_platform():
    own = {"mlflow": {"MLFLOW_AUTH_CONFIG_PATH", "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                      "MLFLOW_FLASK_SERVER_SECRET_KEY"}, "ray-head": {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN",
                                                                    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"}}
    own["ray-worker"] = own["ray-head"]
    for name in ("mlflow", "ray-head", "ray-worker"):
        assert set(env(name)) <= set(ENV_VARS) | own[name], name
    assert (env("ray-head")["MLFLOW_TRACKING_USERNAME"], env("ray-head")["MLFLOW_TRACKING_PASSWORD"]) == \
        (env("mlflow")["MLFLOW_AUTH_ADMIN_USERNAME"], env("mlflow")["MLFLOW_AUTH_ADMIN_PASSWORD"])
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


def test_gpu_worker_groups_land_on_gpu_nodes_with_the_cuda_image():
    # the default image build is the CUDA one: PyPI's torch wheels, CUDA runtime in the lock
    assert re.search(r"^ARG TORCH_INDEX_URL=$", DOCKERFILE, re.M) and "nvidia-cuda-runtime" in _locked()
    for kind, spec in CLUSTERS.items():
        for g in spec["workerGroupSpecs"]:
            pod = g["template"]["spec"]
            gpus = {c["resources"]["limits"].get("nvidia.com/gpu", 0) for c in pod["containers"]}
            if gpus == {0}:
                continue
            assert all(c["resources"]["requests"].get("nvidia.com/gpu") == c["resources"]["limits"]["nvidia.com/gpu"]
                       for c in pod["containers"]), (kind, g["groupName"])  # extended resources: requests = limits
            assert str(g.get("rayStartParams", {}).get("num-gpus", sum(gpus))) == str(sum(gpus)), (kind, g["groupName"])
            assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), (kind, g["groupName"])
            for c in pod["containers"]:
                assert not c["image"].endswith(":cpu"), (kind, c["image"])  # the CPU-only build has no CUDA


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


# ----------------------------------------------------------------------------- closed by default

INFRA = ROOT / "infra"
MANIFESTS = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _docs() -> list[tuple[Path, dict]]:
    return [(f, d) for f in MANIFESTS for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]


def _ray_cluster_specs(doc: dict) -> list[dict]:
    spec = doc.get("spec") or {}
    return {"RayCluster": [spec], "RayJob": [spec.get("rayClusterSpec")],
            "RayService": [spec.get("rayClusterConfig")]}.get(doc.get("kind"), [])


def _words(command) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command or []]


def _flag(words: list[str], name: str, default=None):
    for i, w in enumerate(words):
        if w == name and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
    return default


def _required(raw) -> bool:
    """A compose value that is only ${VAR:?message}: compose refuses to start without it."""
    m = VAR.fullmatch(str(raw).strip())
    return bool(m and m[2] in (":?", "?"))


def _k8s_token_auth(cluster: dict) -> bool:
    """KubeRay's authOptions, or RAY_AUTH_MODE=token + RAY_AUTH_TOKEN from a Secret in every container."""
    if (cluster.get("authOptions") or {}).get("mode") == "token":
        return True
    for c in containers(cluster):
        env = {e["name"]: e for e in c.get("env", [])}
        if env.get("RAY_AUTH_MODE", {}).get("value") != "token" or \
                "secretKeyRef" not in (env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") or {}):
            return False
    return True


def test_every_infra_file_is_checked():
    assert {f.name for f in MANIFESTS} >= {"docker-compose.yml", "raycluster.yaml", "rayjob-sweep.yaml",
                                           "rayservice.yaml", "secret-api-keys.yaml", "secret-mlflow-s3.yaml"}
    kinds = {d.get("kind") for _, d in _docs() if "kind" in d}
    assert kinds <= {"RayCluster", "RayJob", "RayService", "Secret"}, f"unchecked kinds: {kinds}"
    for f, d in _docs():
        if "rayStartParams" in yaml.safe_dump(d):
            assert _ray_cluster_specs(d), f"{f.name}: a Ray cluster of kind {d.get('kind')} is not checked"


def test_no_ray_dashboard_reachable_without_a_token():
    # KubeRay: the head's dashboard-host defaults to 0.0.0.0
    for f, d in _docs():
        for cluster in _ray_cluster_specs(d):
            host = cluster["headGroupSpec"].get("rayStartParams", {}).get("dashboard-host", "0.0.0.0")
            assert host in LOOPBACK or _k8s_token_auth(cluster), f"{f.name}: Ray dashboard on {host} without token auth"
    # compose: every `ray start` (a worker without the token cannot join a token-auth head either)
    for name, svc in SERVICES.items():
        words = _words(svc.get("command"))
        if words[:2] != ["ray", "start"]:
            continue
        raw = svc.get("environment", {})
        host = _flag(words, "--dashboard-host", "127.0.0.1" if "--head" in words else None)
        if host in LOOPBACK:
            continue
        assert raw.get("RAY_AUTH_MODE") == "token" and _required(raw.get("RAY_AUTH_TOKEN")), \
            f"compose {name}: `ray start` on {host} without RAY_AUTH_MODE=token and a required RAY_AUTH_TOKEN"


def test_mlflow_is_never_served_without_auth():
    servers = 0
    for name, svc in SERVICES.items():
        words = _words(svc.get("command"))
        if words[:2] == ["mlflow", "server"]:
            servers += 1
            host = _flag(words, "--host", "127.0.0.1")
            assert host in LOOPBACK or _flag(words, "--app-name") == "basic-auth", f"compose {name}: MLflow on {host} without auth"
            raw = svc.get("environment", {})
            for var in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
                assert _required(raw.get(var)), f"compose {name}: {var} must come from .env"
    for f, d in _docs():
        assert "mlflow server" not in yaml.safe_dump(d) or d.get("kind") is None, f"{f.name}: an MLflow server to check"
    assert servers == 1


def test_compose_has_no_default_or_literal_secrets():
    for var, op, default in VAR.findall(COMPOSE_TEXT):
        if SECRET_NAME.search(var):
            assert op in (":?", "?"), f"${{{var}}} must be required (${{{var}:?...}}), not defaulted"
            assert DOTENV.get(var, "") == "", f".env.example ships a value for {var}"
    for name, svc in SERVICES.items():
        for key, raw in (svc.get("environment") or {}).items():
            if SECRET_NAME.search(key):
                assert "${" in str(raw) and VAR.search(str(raw)), f"compose {name}: {key} is a literal"


def test_shipped_k8s_secrets_hold_no_usable_credential():
    secrets = [(f, d) for f, d in _docs() if d.get("kind") == "Secret"]
    assert len(secrets) == 2
    for f, d in secrets:
        assert not d.get("data"), f"{f.name}: ship stringData placeholders, never encoded values"
        for key, value in (d.get("stringData") or {}).items():
            if key.endswith(".json"):
                assert json.loads(value) == {}, f"{f.name}: {key} ships API keys"
            elif SECRET_NAME.search(key) or key in SECRET_ENV_VARS:
                assert value == "", f"{f.name}: {key} ships a value"


# ----------------------------------------------------------------------------- reproducible builds

def _locked() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [ln.split("==") for ln in lines if ln.strip() and not ln.startswith("#")]
    assert all(len(p) == 2 for p in pins), "constraints.txt holds only NAME==VERSION lines"
    return {name.lower().replace("_", "-"): version for name, version in pins}


def test_ray_version_agrees_across_pyproject_lock_image_and_manifests():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {re.match(r"[\w.-]+", d)[0].lower(): d for d in deps}
    ray_dep = re.fullmatch(r"ray\[[\w,]+\]==(\S+)", pinned["ray"])
    assert ray_dep, f"pyproject must pin ray exactly: {pinned['ray']}"
    versions = {"pyproject.toml": ray_dep[1], "constraints.txt": _locked()["ray"],
                "Dockerfile": re.search(r"^ARG RAY_VERSION=(\S+)", DOCKERFILE, re.M)[1]}
    for f, d in _docs():
        for cluster in _ray_cluster_specs(d):
            versions[f"{f.name} ({d['kind']})"] = cluster["rayVersion"]
    assert len(set(versions.values())) == 1, versions
    for name in ("torch", "torchvision"):  # the exact pins of pyproject are the lock's
        assert pinned[name] == f"{name}=={_locked()[name]}"


def test_make_and_the_image_install_under_the_same_lock():
    make = (ROOT / "Makefile").read_text()
    stamp = re.search(r"^\$\(STAMP\):(.*)\n((?:\t.*\n)+)", make, re.M)
    assert "constraints.txt" in stamp[1].split("|")[0], "the venv must be rebuilt when the lock changes"
    assert re.search(r"pip install .*-c constraints\.txt -e '\.\[test(,docs)?\]'", stamp[2])  # + the docs site
    assert re.search(r"^lock:", make, re.M) and "pip freeze" in make
    # the image: locked dependencies from pyproject + lock alone, then the source (cached layer)
    copies = [(m.start(), m[1]) for m in re.finditer(r"^COPY (.*)$", DOCKERFILE, re.M)]
    install = re.search(r"pip install --no-cache-dir -c constraints\.txt '\.\[postgres\]'", DOCKERFILE)
    assert install and copies[0][1].split()[:-1] == ["pyproject.toml", "constraints.txt", "README.md"]
    assert copies[0][0] < install.start() < copies[1][0] and copies[1][1] == ". ."
    assert not re.search(r"pip install(?!.*-c constraints\.txt).*\bray\b", DOCKERFILE), "Ray comes from the lock"
    locked = _locked()
    assert "psycopg2-binary" in locked and "pytest" in locked and "moto" in locked
