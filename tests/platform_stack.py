"""The embedded platform for integration tests: a real S3-compatible HTTP server (moto's server
mode) on 127.0.0.1, MLflow on SQLite with artifacts in that bucket, a tiny backbone weights file,
and the env vars the platform reads. Ray is started by each test module as it needs.

Each stack has its own server and database (tests count runs, versions and keys). A new database
is a copy of one migrated once per MLflow version (``sqlite_store``): Alembic's migrations were most
of a stack's start-up, and of every test's own registry."""

from __future__ import annotations

import json
import os
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

TINY = dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=2)
BUCKET = "petl-test"


def bench_module(name: str):
    """``bench/<name>.py`` imported as module ``bench_<name>`` (bench/ is scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_backbone(folder: Path) -> str:
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=0, **TINY)
    path = folder / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (folder / "tiny_vit.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": TINY}))
    return str(path)


def _sqlite_template() -> Path:
    """An MLflow SQLite database with every table migrated and no experiment in it, built once per
    MLflow version under $PETL_CACHE (Alembic's migrations take 5-15 s on a 2-core machine)."""
    import mlflow
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    path = Path(os.environ["PETL_CACHE"]).resolve() / f"test-mlflow-{mlflow.__version__}.db"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        engine = sqlalchemy.create_engine(f"sqlite:///{tmp}")
        try:
            _initialize_tables(engine)
        finally:
            engine.dispose()
        os.replace(tmp, path)  # atomic: a concurrent session sees no file or a whole one
    return path


def sqlite_store(path: Path, artifact_root: str) -> str:
    """``sqlite:///path`` for a new, empty MLflow store with ``artifact_root``: a copy of the migrated
    template, opened the way ``TrackingSettings.open_store`` opens a new database (experiment
    Default, id 0, under the artifact root), without running the migrations again."""
    import shutil

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    from petl_platform.tracking.settings import _as_uri

    path = Path(path).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_sqlite_template(), path)
    SqlAlchemyStore(f"sqlite:///{path}", _as_uri(artifact_root)).engine.dispose()
    return f"sqlite:///{path}"


@contextmanager
def platform_stack(root: Path):
    """Yields a dict: ``backbone`` (weights file), ``settings`` (TrackingSettings), ``s3`` (boto3
    client), ``endpoint``. Restores the environment and stops the S3 server afterwards."""
    from moto.server import ThreadedMotoServer

    tracking_uri = sqlite_store(root / "mlflow.db", f"s3://{BUCKET}/mlflow")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    saved = dict(os.environ)
    os.environ.update({
        "MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "PETL_HOME": str(root / "home"),
        "MLFLOW_TRACKING_URI": tracking_uri, "PETL_ARTIFACT_ROOT": f"s3://{BUCKET}/mlflow",
        "PETL_STORAGE_PATH": str(root / "ray_results"), "PETL_CACHE": os.path.abspath(os.environ["PETL_CACHE"]),
        # a cluster's `python` is the interpreter with the project installed: this venv's
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
        "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0", "RAY_DEDUP_LOGS": "0",
    })
    try:
        from petl_platform.tracking.settings import TrackingSettings, s3_client

        s3 = s3_client()
        s3.create_bucket(Bucket=BUCKET)
        yield {"backbone": write_tiny_backbone(root), "settings": TrackingSettings.from_env(), "s3": s3,
               "endpoint": f"http://127.0.0.1:{port}"}
    finally:
        os.environ.clear()
        os.environ.update(saved)
        server.stop()


def s3_keys(s3, prefix: str = "") -> list[str]:
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


class StallProxy:
    """A TCP proxy on 127.0.0.1 in front of a server (the S3 server here) that can be made to hang:
    while ``stalled`` is set, bytes already in flight and new connections wait, as behind a store
    that stopped answering; clearing it lets everything through again."""

    def __init__(self, target_port: int):
        import threading

        self.target = ("127.0.0.1", target_port)
        self.stalled = threading.Event()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self):
        import threading

        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst):
        import time

        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                while self.stalled.is_set() and not self._stop.is_set():
                    time.sleep(0.05)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self._stop.set()
        self.sock.close()
