"""Where runs, artifacts and checkpoints go: embedded defaults on one machine, env vars in production.

| env var | meaning | embedded default |
|---|---|---|
| ``MLFLOW_TRACKING_URI`` | MLflow backend (``sqlite:///…``, ``postgresql://…``) or server (``http://…``) | ``sqlite:///$PETL_HOME/mlflow.db`` |
| ``PETL_ARTIFACT_ROOT`` | artifact root of new experiments: ``s3://bucket/prefix`` or a directory | ``$PETL_HOME/mlartifacts`` (unset with an MLflow server: the server decides) |
| ``MLFLOW_S3_ENDPOINT_URL`` | S3-compatible endpoint (MinIO, moto); unset for AWS | — |
| ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_DEFAULT_REGION`` | S3 credentials | — |
| ``PETL_STORAGE_PATH`` | Ray Train/Tune storage (checkpoints): a directory or ``s3://…`` | ``$PETL_HOME/ray_results`` |
| ``RAY_ADDRESS`` | Ray cluster (``auto``, ``HOST:6379``) or Jobs API (``http://HEAD:8265``) | a local cluster started on demand |
| ``PETL_HOME`` | root of the embedded defaults | ``./.petl`` |
"""

from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import PetlError

# Every variable the platform (or the MLflow / boto3 clients it drives) reads.
ENV_VARS = ("MLFLOW_TRACKING_URI", "PETL_ARTIFACT_ROOT", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "PETL_STORAGE_PATH", "PETL_HOME",
            "PETL_CACHE", "MLFLOW_S3_IGNORE_TLS", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN")
# Credentials never travel in a Ray runtime_env: Ray writes runtime_env env_vars into its logs
# (runtime_env_agent.log) and stores them with the job. A job reads them from the cluster's own
# environment (a cluster started by ``ray.init`` inherits this process's; a remote one gets them
# from a Kubernetes Secret or compose's .env). The key id travels with its secret, so a job
# never pairs one place's id with another's secret.
SECRET_ENV_VARS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                             "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"})
CHAMPION = "champion"


def petl_home() -> Path:
    return Path(os.environ.get("PETL_HOME", ".petl")).absolute()


def forwarded_env() -> dict[str, str]:
    """The platform's non-secret env vars that are set here, for a Ray ``runtime_env``."""
    return {k: os.environ[k] for k in ENV_VARS if os.environ.get(k) and k not in SECRET_ENV_VARS}


def check_no_secrets(env: dict[str, str]) -> None:
    """Refuse credentials bound for a ``runtime_env`` (``petl submit --env``), see SECRET_ENV_VARS."""
    secret = sorted(k for k in env if k in SECRET_ENV_VARS or k == "RAY_AUTH_TOKEN")
    if secret:
        raise PetlError(f"--env {', '.join(secret)}: credentials are not sent with a job (Ray logs and stores "
                        "its runtime_env); set them in the cluster's environment instead (a Kubernetes Secret, "
                        "infra/compose/.env)")


@dataclass(frozen=True)
class TrackingSettings:
    tracking_uri: str
    artifact_root: str | None = None  # None: the tracking server's default
    storage_path: str = ""

    @classmethod
    def from_env(cls, tracking_uri: str | None = None, artifact_root: str | None = None,
                 storage_path: str | None = None) -> "TrackingSettings":
        home = petl_home()
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}"
        root = artifact_root or os.environ.get("PETL_ARTIFACT_ROOT")
        if root is None and not uri.startswith(("http://", "https://", "databricks")):
            root = str(home / "mlartifacts")
        storage = storage_path or os.environ.get("PETL_STORAGE_PATH") or str(home / "ray_results")
        return cls(uri, root, storage)

    def to_dict(self) -> dict:
        return asdict(self)

    def prepare(self) -> "TrackingSettings":
        """Create local directories and check every remote store up front; one-line errors."""
        if self.tracking_uri.startswith("sqlite:///"):
            Path(self.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
            self.open_store()
        for where in (self.artifact_root, self.storage_path):
            if where and where.startswith("s3://"):
                check_s3(where)
            elif where and "://" not in where:
                Path(where).mkdir(parents=True, exist_ok=True)
        check_tracking(self.tracking_uri)
        return self

    def open_store(self) -> None:
        """Create a new embedded (sqlite) store with this artifact root. MLflow creates experiment
        ``Default`` (id 0) when it first opens a database, under ``./mlruns`` of the *working
        directory* unless the store is opened with a root; opened here first, ``Default`` lives
        under the artifact root ($PETL_HOME/mlartifacts/0) like every other experiment."""
        key = (self.tracking_uri, self.artifact_root)
        if key in _OPENED or not self.tracking_uri.startswith("sqlite:///") or not self.artifact_root:
            return
        db = Path(self.tracking_uri[len("sqlite:///"):])
        if not db.exists():
            if not db.parent.is_dir():  # prepare() creates it; MLflow's own error otherwise
                return
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            SqlAlchemyStore(self.tracking_uri, _as_uri(self.artifact_root))
        _OPENED.add(key)

    def experiment(self, name: str) -> str:
        """The id of MLflow experiment ``name``, created with this artifact root if new."""
        import mlflow

        self.open_store()
        client = mlflow.MlflowClient(self.tracking_uri)
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        root = self.artifact_root
        location = None
        if root:
            location = f"{root.rstrip('/')}/{name}" if "://" in root else Path(root, name).absolute().as_uri()
        return client.create_experiment(name, artifact_location=location)


_OPENED: set = set()  # (tracking URI, artifact root) pairs open_store has seen in this process


def _as_uri(root: str) -> str:
    """An artifact root as a URI: ``s3://...`` as is, a directory as an absolute ``file://`` URI."""
    return root if "://" in root else Path(root).absolute().as_uri()


def s3_client(fail_fast: bool = False):
    import boto3
    from botocore.config import Config

    config = Config(connect_timeout=3, read_timeout=10, retries={"max_attempts": 1}) if fail_fast else None
    return boto3.client("s3", endpoint_url=os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None, config=config)


_S3_CLIENTS: dict = {}
_S3_LOCK = threading.Lock()


def shared_s3_client():
    """One boto3 S3 client per endpoint for the process (clients are thread-safe and costly to
    create: a serving replica reuses this one for every adapter it downloads)."""
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    with _S3_LOCK:
        if endpoint not in _S3_CLIENTS:
            _S3_CLIENTS[endpoint] = s3_client()
        return _S3_CLIENTS[endpoint]


def check_s3(url: str) -> None:
    """Fail now, in one line, if the bucket of ``url`` is unreachable, missing or forbidden."""
    import botocore.exceptions as bx

    bucket = urlparse(url).netloc
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or "AWS S3"
    try:
        s3_client(fail_fast=True).head_bucket(Bucket=bucket)
    except bx.EndpointConnectionError:
        raise PetlError(f"S3 endpoint {endpoint} is unreachable (MLFLOW_S3_ENDPOINT_URL); is the store running?") from None
    except bx.NoCredentialsError:
        raise PetlError(f"no S3 credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from None
    except bx.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            raise PetlError(f"S3 bucket {bucket!r} does not exist at {endpoint}; create it first") from None
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise PetlError(f"S3 credentials were refused for bucket {bucket!r} at {endpoint} ({code})") from None
        raise PetlError(f"S3 bucket {bucket!r} at {endpoint}: {code or e}") from None


def check_tracking(uri: str) -> None:
    """An MLflow server must answer; a database URL must open."""
    import mlflow

    if uri.startswith(("http://", "https://")):  # MLflow's client would retry for minutes
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5).close()
        except OSError as e:
            raise PetlError(f"MLflow tracking server {uri} is unreachable ({getattr(e, 'reason', e)}); "
                            "is `mlflow server` running? (MLFLOW_TRACKING_URI)") from None
    try:
        mlflow.MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:  # noqa: BLE001 - any failure here means the store is unusable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PetlError(f"MLflow tracking store {uri} is unusable: {first[:200]}") from None
