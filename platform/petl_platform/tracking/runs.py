"""MLflow runs and the model registry, through ``MlflowClient`` with an explicit tracking URI.

Trials never rely on a process-global ``mlflow.set_tracking_uri`` or an active run (the tracking
URI is passed in the trial config, so it reaches every Ray worker), and a restored trial reopens
the run id stored in its checkpoint, so a resumed trial continues one run instead of starting
another."""

from __future__ import annotations

import math
import os
import subprocess
import tempfile
from pathlib import Path

from ..errors import NotFoundError, PetlError
from .settings import CHAMPION, TrackingSettings

ADAPTER_PATH = "adapter"  # artifact directory of every run that trained an adapter
CHALLENGER = "challenger"  # alias of the newest registered version, whether or not it became champion
SPLIT_TAG = "petl.val_split"  # identity of the val split a version's metric was measured on
PROMOTION_TAG = "petl.promotion"  # why an alias moved (or did not), on the version and the model


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def client(settings: TrackingSettings):
    import mlflow

    settings.open_store()  # a new embedded store gets its Default experiment under the artifact root
    return mlflow.MlflowClient(settings.tracking_uri)


class RunLogger:
    """One MLflow run: params, step metrics, tags, artifacts. As a context manager the run ends
    FINISHED, or FAILED with the reason (``petl.failure`` tag) on an exception, keeping everything
    logged so far."""

    def __init__(self, settings: TrackingSettings, experiment: str, run_id: str | None = None,
                 run_name: str | None = None, tags: dict | None = None):
        self.client = client(settings)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp = settings.experiment(experiment)
            self.run_id = self.client.create_run(exp, run_name=run_name, tags=tags or {}).info.run_id
        if run_id and tags:
            self.set_tags(tags)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_metrics(self, metrics: dict, step: int) -> None:
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        now = get_current_time_millis()
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=rows)

    def set_tags(self, tags: dict) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, local_dir, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def log_figure(self, fig_path, artifact_path: str = "plots") -> None:
        self.client.log_artifact(self.run_id, str(fig_path), artifact_path)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def fail(self, reason: str) -> None:
        mark_failed(self.client, self.run_id, reason)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None:
            self.fail(f"{exc_type.__name__}: {exc}")
        else:
            self.finish()
        return False


def mark_failed(mlflow_client, run_id: str, reason: str) -> None:
    mlflow_client.set_tag(run_id, "petl.failure", reason[:5000])
    mlflow_client.set_terminated(run_id, "FAILED")


# a Ray Tune trial whose worker died before Tune registered its first checkpoint restarts from
# scratch, in a new MLflow run: the run it leaves behind would stay RUNNING for ever
LOST_BEFORE_CHECKPOINT = ("interrupted: its worker was lost before Tune registered a checkpoint of this run "
                          "(a restart begins a new run)")


def fail_running(mlflow_client, experiment_id: str, filter_string: str, keep, reason: str) -> None:
    """Marks FAILED, with ``reason``, every RUNNING run of the experiment that ``filter_string``
    finds, except the run ids in ``keep``."""
    for run in mlflow_client.search_runs([experiment_id], f"{filter_string} and attributes.status = 'RUNNING'"):
        if run.info.run_id not in keep:
            mark_failed(mlflow_client, run.info.run_id, reason)


# ------------------------------------------------------------------------------------- registry
def register_adapter(settings: TrackingSettings, run_id: str, name: str, alias: str | None = CHAMPION,
                     tags: dict | None = None):
    """Register run ``run_id``'s adapter artifact as a new version of model ``name`` and point
    ``alias`` at it. Returns the ``ModelVersion``."""
    from mlflow.exceptions import MlflowException

    c = client(settings)
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="PETL adapter + head for one task (petl-platform)")
    source = f"{c.get_run(run_id).info.artifact_uri.rstrip('/')}/{ADAPTER_PATH}"
    mv = c.create_model_version(name, source, run_id=run_id, tags={k: str(v) for k, v in (tags or {}).items()})
    if alias:
        c.set_registered_model_alias(name, alias, mv.version)
    return mv


def register_challenger(settings: TrackingSettings, run_id: str, name: str, *, value: float, split_id: str,
                        metric: str = "val_accuracy", promote: bool = False, tags: dict | None = None,
                        champion: str = CHAMPION) -> dict:
    """Register run ``run_id``'s adapter as a new version of ``name`` with alias ``challenger``,
    and move alias ``champion`` to it only when there is no champion yet, when its ``metric`` is
    >= the champion's on the same val split (tag ``petl.val_split``), or when ``promote`` forces
    it. The decision is tagged (``petl.promotion``) on the version and the model, and returned."""
    if champion == CHALLENGER:
        raise PetlError(f"alias {CHALLENGER!r} is reserved for the newest version; pick another champion alias")
    if not math.isfinite(value):
        raise PetlError(f"cannot register {name!r}: its {metric} is {value}, not a number to compare")
    c = client(settings)
    current = _alias_target(c, name, champion)
    mv = register_adapter(settings, run_id, name, CHALLENGER,
                          tags={**(tags or {}), metric: value, SPLIT_TAG: split_id})
    decision, reason = _decide(current, int(mv.version), value, split_id, metric, promote, champion)
    moved = decision in ("first", "promoted", "forced")
    if moved:
        c.set_registered_model_alias(name, champion, mv.version)
    _record(c, name, mv.version, f"{decision}: {reason}")
    return {"name": name, "version": int(mv.version), "alias": champion, "champion_moved": moved,
            "champion_version": int(mv.version) if moved else int(current.version),
            "previous_champion": int(current.version) if current else None, "decision": decision,
            "reason": f"{decision}: {reason}", metric: value, "val_split": split_id}


def _alias_target(c, name: str, alias: str):
    """The version ``alias`` points at, or None (no such model, or no such alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        version = (c.get_registered_model(name).aliases or {}).get(alias)
    except MlflowException as e:
        if e.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return c.get_model_version(name, version) if version else None


def _decide(current, version: int, value: float, split_id: str, metric: str, promote: bool,
            champion: str) -> tuple[str, str]:
    """``(decision, reason)``: first / promoted / forced move the champion alias; kept does not."""
    new = f"challenger v{version} {metric} {value:.4f}"
    if current is None:
        return "first", f"no {champion} yet; {new} on val split {split_id}"
    tags = dict(current.tags or {})
    old_split, old_value = tags.get(SPLIT_TAG), _float(tags.get(metric))
    old = f"{champion} v{current.version} " + (f"{metric} {old_value:.4f}" if old_value is not None else f"(no {metric})")
    if promote:
        return "forced", f"{new} replaces {old} (--promote)"
    if old_value is None:
        return "kept", f"{old} has no {metric} tag to compare with; {new} stays challenger (--promote to force)"
    if old_split != split_id:
        return "kept", (f"{new} was measured on val split {split_id}, {old} on {old_split or 'an unrecorded one'}; "
                        "not comparable (--promote to force)")
    if value >= old_value:
        return "promoted", f"{new} >= {old} on val split {split_id}"
    return "kept", f"{new} < {old} on val split {split_id}"


def _float(text) -> float | None:
    try:
        return float(text) if text is not None and math.isfinite(float(text)) else None
    except ValueError:
        return None


def _record(c, name: str, version, reason: str) -> None:
    c.set_model_version_tag(name, str(version), PROMOTION_TAG, reason[:5000])
    c.set_registered_model_tag(name, PROMOTION_TAG, f"v{version} {reason}"[:5000])


def log_and_register(settings: TrackingSettings, model, name: str, classes: list[str], experiment: str = "petl",
                     run_name: str | None = None, alias: str | None = CHAMPION, metrics: dict | None = None):
    """Log ``model``'s adapter as a new MLflow run and register it as the next version of ``name``
    (alias ``alias`` moved to it), for models trained outside a sweep. The run records the method,
    ``hparams.<name>`` for each hyperparameter, ``num_trainable`` and ``metrics`` (e.g.
    ``val_accuracy``, ``test_accuracy``; non-finite values are skipped). Returns the ``ModelVersion``."""
    from .artifacts import save_adapter

    with tempfile.TemporaryDirectory() as d, RunLogger(settings, experiment, run_name=run_name or name,
                                                       tags={"petl.task": name, "petl.method": model.method}) as run:
        run.log_params({"method": model.method, "num_trainable": model.num_trainable(),
                        **{f"hparams.{k}": v for k, v in model.config.to_dict().items()}})
        if metrics:
            run.log_metrics(metrics, step=0)
        save_adapter(model, d, task=name, classes=classes)
        run.log_artifacts(d, ADAPTER_PATH)
    return register_adapter(settings, run.run_id, name, alias, tags={"task": name, "method": model.method})


def _version(c, name: str, ref: str | None):
    from mlflow.exceptions import MlflowException

    try:
        if ref is None or ref == "":
            ref = CHAMPION
        if ref.isdigit():
            return c.get_model_version(name, ref)
        return c.get_model_version_by_alias(name, ref)
    except MlflowException as e:
        # the registry says it does not exist (a missing alias is INVALID_PARAMETER_VALUE), or the store failed
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise NotFoundError(f"registered model {name!r} has no version or alias {ref!r} ({e.error_code})") from None
        raise PetlError(f"registry lookup of {name!r} {ref!r} failed ({e.error_code}): "
                        f"{str(e.message).splitlines()[0][:200]}") from None


def split_model_ref(ref: str) -> tuple[str, str | None]:
    """``task@alias`` / ``task/3`` / ``models:/task@alias`` → ``(name, alias-or-version)``."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, alias
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, version
    return ref, None


def list_models(settings: TrackingSettings) -> list[dict]:
    c = client(settings)
    rows = []
    for rm in c.search_registered_models():
        versions = c.search_model_versions(f"name='{rm.name}'")
        rows.append({"name": rm.name, "aliases": dict(rm.aliases or {}),
                     "versions": sorted(int(v.version) for v in versions)})
    return sorted(rows, key=lambda r: r["name"])


def show_model(settings: TrackingSettings, ref: str) -> dict:
    c = client(settings)
    name, ver = split_model_ref(ref)
    mv = _version(c, name, ver)
    rm = c.get_registered_model(name)
    return {"name": name, "version": int(mv.version), "aliases": [a for a, v in (rm.aliases or {}).items() if v == mv.version],
            "run_id": mv.run_id, "source": mv.source, "tags": dict(mv.tags or {}), "status": mv.status}


def promote(settings: TrackingSettings, name: str, version: str, alias: str = CHAMPION) -> dict:
    """``petl registry promote``: the manual override, recorded like the automatic decisions."""
    c = client(settings)
    mv = _version(c, name, str(version))
    was = _alias_target(c, name, alias)
    c.set_registered_model_alias(name, alias, mv.version)
    _record(c, name, mv.version, f"manual: {alias} moved to v{mv.version} by `petl registry promote`"
                                 + (f" (was v{was.version})" if was else ""))
    return show_model(settings, f"{name}/{mv.version}")


def fetch_adapter(settings: TrackingSettings, ref: str, dst: str | None = None) -> tuple[Path, dict]:
    """Download the adapter of ``models:/name@alias`` (or ``name/version``) to a local directory;
    returns ``(path, version_info)``. Works for every artifact store MLflow can read; an ``s3://``
    source is read with one shared boto3 client (a list and one GET per file), which is what a
    serving replica does on every cold task load."""
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # adapters are small; no bars in logs
    name, ver = split_model_ref(ref)
    mv = _version(client(settings), name, ver)
    info = {"name": name, "version": int(mv.version), "run_id": mv.run_id, "source": mv.source,
            "tags": dict(mv.tags or {}), "status": mv.status}
    dst = dst or tempfile.mkdtemp(prefix=f"petl-{info['name']}-v{info['version']}-")
    os.makedirs(dst, exist_ok=True)
    try:
        if mv.source.startswith("s3://"):
            return _download_s3(mv.source, Path(dst)), info
        path = mlflow.artifacts.download_artifacts(artifact_uri=info["source"], dst_path=dst,
                                                   tracking_uri=settings.tracking_uri)
    except PetlError:
        raise
    except Exception as e:  # noqa: BLE001 - S3 / filesystem errors of many kinds
        raise PetlError(f"cannot download {info['name']} v{info['version']} from {info['source']}: "
                        f"{str(e).splitlines()[0][:200]}") from None
    return Path(path), info


def _download_s3(source: str, dst: Path) -> Path:
    """An adapter directory ``s3://bucket/prefix`` into ``dst/<prefix name>``: its two files
    (weights and config), fetched side by side with the shared client, no listing needed."""
    from concurrent.futures import ThreadPoolExecutor

    from .artifacts import CONFIG, WEIGHTS
    from .settings import shared_s3_client

    bucket, _, prefix = source[len("s3://"):].partition("/")
    prefix = prefix.rstrip("/")
    s3 = shared_s3_client()
    out = dst / Path(prefix).name
    out.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(2) as pool:
        for f in [pool.submit(s3.download_file, bucket, f"{prefix}/{name}", str(out / name)) for name in (WEIGHTS, CONFIG)]:
            f.result()
    return out
