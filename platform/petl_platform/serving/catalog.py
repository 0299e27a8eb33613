"""The servable tasks: every registered model whose serving alias is set, optionally narrowed by a
name pattern (``fnmatch``: ``"*-1k"``) and a registered-model tag (``"team=vision"``).

The catalog is read from the MLflow registry in the background (``refresh``, every ``refresh_s``);
a task registered since the last refresh is looked up on its first request (``lookup``). Each row
names the version the alias points at and that version's method (the ``method`` tag the platform
sets when it registers, else the artifact's ``adapter_config.json``), so when an alias moves to a
version of another method, the task is routed by the new one. Ray-free: the Serve ingress wraps it."""

from __future__ import annotations

import fnmatch
import logging
import threading
import time

from ..errors import NotFoundError, PetlError
from ..methods import get_method
from ..tracking.runs import client
from ..tracking.settings import CHAMPION, TrackingSettings

log = logging.getLogger(__name__)


class Catalog:
    def __init__(self, settings: TrackingSettings, alias: str = CHAMPION, pattern: str | None = None,
                 tag: str | None = None, refresh_s: float = 10.0):
        if tag is not None and "=" not in tag:
            raise PetlError(f"task_tag must be KEY=VALUE, got {tag!r}")
        self.settings, self.alias, self.pattern, self.refresh_s = settings, alias, pattern, refresh_s
        self.tag = tuple(tag.split("=", 1)) if tag else None
        self.rows: dict[str, dict] = {}
        self.refreshed_at: float | None = None  # monotonic time of the last complete refresh
        self.last_error: str | None = None
        self._described: dict[tuple[str, int], dict] = {}  # (name, version) -> row: a version never changes
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ reading the registry
    def selects(self, name: str, tags: dict | None = None) -> bool:
        if self.pattern and not fnmatch.fnmatchcase(name, self.pattern):
            return False
        return self.tag is None or (tags or {}).get(self.tag[0]) == self.tag[1]

    def _row(self, c, name: str, version: int) -> dict:
        """The catalog row of ``name`` at ``version`` (method from the version's tag or artifact)."""
        key = (name, int(version))
        if key in self._described:
            return self._described[key]
        mv = c.get_model_version(name, str(version))
        method = (mv.tags or {}).get("method")
        row = {"task": name, "alias": self.alias, "version": int(version)}
        if method is None:  # registered by hand: read the artifact's adapter_config.json
            from .models import describe

            found = describe(self.settings, name, self.alias, version=int(version))
            if "error" in found:
                return {**row, "error": found["error"]}  # not cached: a store fault may pass
            method, row["classes"] = found["method"], found.get("classes")
        try:
            row.update(method=method, runtime=get_method(method).runtime)
        except PetlError:
            row["error"] = f"task {name!r} version {version} uses method {method!r}, which this server does not know"
        self._described[key] = row
        return row

    def refresh(self) -> None:
        """Re-read every registered model (paged) and keep those with the alias that the filters select."""
        from mlflow.exceptions import MlflowException

        c = client(self.settings)
        rows, token = {}, None
        try:
            while True:
                page = c.search_registered_models(max_results=1000, page_token=token)
                for rm in page:
                    version = (rm.aliases or {}).get(self.alias)
                    if version is not None and self.selects(rm.name, rm.tags):
                        rows[rm.name] = self._row(c, rm.name, int(version))
                token = page.token
                if not token:
                    break
        except (MlflowException, OSError, PetlError) as e:
            self.last_error = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            log.warning("catalog refresh failed, keeping %d tasks: %s", len(self.rows), self.last_error)
            return
        with self._lock:
            self.rows, self.refreshed_at, self.last_error = rows, time.monotonic(), None

    def lookup(self, task: str, fresh: bool = False) -> dict | None:
        """The row of ``task``, looked up in the registry when the catalog does not list it yet
        (registered since the last refresh) or when ``fresh`` asks for the registry's current answer
        (the alias may have moved since); ``None`` when it is not registered with the alias or the
        filters leave it out. Registry faults raise ``PetlError``."""
        from mlflow.exceptions import MlflowException

        row = None if fresh else self.rows.get(task)
        if row is not None:
            return row
        c = client(self.settings)
        try:
            rm = c.get_registered_model(task)
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" in getattr(e, "error_code", ""):
                return None
            raise PetlError(f"model registry: {str(e).splitlines()[0][:200]}") from None
        version = (rm.aliases or {}).get(self.alias)
        if version is None or not self.selects(task, rm.tags):
            return None
        try:
            row = self._row(c, task, int(version))
        except NotFoundError:
            return None
        with self._lock:
            self.rows[task] = row
        return row

    def tasks(self) -> list[str]:
        return sorted(self.rows)

    # ------------------------------------------------------------------ background refresh
    def start(self) -> None:
        """Refresh now and then every ``refresh_s`` on a daemon thread (a hung registry hangs only it)."""
        if self._thread is None:
            def loop():
                while True:
                    try:
                        self.refresh()
                    except Exception:  # noqa: BLE001 - the loop must outlive any one fault
                        log.exception("catalog refresh failed")
                    if self._stop.wait(self.refresh_s):
                        return

            self._thread = threading.Thread(target=loop, name="petl-catalog", daemon=True)
            self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.refreshed_at is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.refreshed_at is not None

    def close(self) -> None:
        self._stop.set()
