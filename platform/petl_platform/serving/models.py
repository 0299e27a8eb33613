"""Per-replica cache of task models: adapters loaded from the MLflow registry alias
(``models:/<task>@champion``) onto the replica's one frozen backbone, LRU-evicted, refreshed when
the alias moves (the new version is loaded before the old one is dropped, so no request is lost).
An adapter for another backbone fingerprint, or holding NaN/inf, is refused: the task is reported
unavailable (503) and the other tasks are unaffected. The adapter files are downloaded to a temporary
directory that is deleted as soon as the model is loaded."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import NotFoundError, PetlError
from ..inference.engine import measured_gflops
from ..methods.registry import spec_of
from ..tracking.artifacts import load_adapter
from ..tracking.runs import fetch_adapter, show_model
from ..tracking.settings import CHAMPION, TrackingSettings
from .request import ServeError

log = logging.getLogger(__name__)
BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class TaskEntry:
    task: str
    model: torch.nn.Module
    version: int
    method: str
    classes: list[str]
    gflops: float  # measured full-forward GFLOPs per image
    budget_thresholds: dict[float, list[float]] = field(default_factory=dict)  # Dyn-*: val-calibrated
    checked_at: float = 0.0

    def info(self) -> dict:
        return {"task": self.task, "method": self.method, "version": self.version, "classes": self.classes,
                "gflops_per_image": round(self.gflops, 6), "budgets": sorted(self.budget_thresholds)}

    def thresholds_for(self, budget: float) -> list[float]:
        if not self.budget_thresholds:
            raise ServeError(400, f"task {self.task!r} has no calibration data on this server for a budget; "
                                  "send an explicit threshold instead")
        fitting = [b for b in self.budget_thresholds if b <= budget + 1e-9]
        return self.budget_thresholds[max(fitting) if fitting else min(self.budget_thresholds)]


def budget_thresholds(model, task: str, backbone) -> dict[float, list[float]]:
    """Exit thresholds per FLOPs budget, calibrated on the task's val split when this server has
    the task offline; ``{}`` otherwise (requests then give explicit thresholds)."""
    from ..data import get_task, make_transform, to_tensors
    from ..methods.dyn_exit.calibrate import accuracy_flops_curve

    try:
        data = get_task(task)
    except PetlError:
        return {}
    x, y = to_tensors(*data.splits["val"], make_transform(backbone))
    curve = accuracy_flops_curve(model, x, y, BUDGETS)
    return {p["budget"]: p["thresholds"] for p in curve["points"]}


class TaskModelCache:
    def __init__(self, backbone, settings: TrackingSettings, alias: str = CHAMPION, capacity: int = 16,
                 refresh_s: float = 10.0):
        self.backbone, self.settings, self.alias = backbone, settings, alias
        self.capacity, self.refresh_s = capacity, refresh_s
        self.entries: OrderedDict[str, TaskEntry] = OrderedDict()
        self.unavailable: dict[str, tuple[ServeError, float]] = {}
        self.stats = {"hits": 0, "misses": 0, "loads": 0, "refused": 0, "evictions": 0, "refreshes": 0}
        self._lock = threading.RLock()

    def get(self, task: str) -> TaskEntry:
        now = time.monotonic()
        with self._lock:
            entry = self.entries.get(task)
            if entry is not None:
                self.stats["hits"] += 1
                self.entries.move_to_end(task)
                if now - entry.checked_at >= self.refresh_s:
                    entry = self._refresh(entry, now)
                return entry
            self.stats["misses"] += 1
            failed = self.unavailable.get(task)
            if failed and now - failed[1] < self.refresh_s:
                raise failed[0]
            entry = self._load(task)
            self.entries[task] = entry
            while len(self.entries) > self.capacity:
                self.entries.popitem(last=False)
                self.stats["evictions"] += 1
            return entry

    def _refresh(self, entry: TaskEntry, now: float) -> TaskEntry:
        entry.checked_at = now
        try:
            version = show_model(self.settings, f"{entry.task}@{self.alias}")["version"]
        except PetlError as e:  # registry unreachable or alias removed: keep serving what we have
            log.warning("alias check for %s failed, serving v%s: %s", entry.task, entry.version, e)
            return entry
        if version == entry.version:
            return entry
        try:
            new = self._load(entry.task)
        except ServeError as e:  # the new version is refused: keep the old one, report it
            log.error("task %s: version %s refused, still serving v%s: %s", entry.task, version, entry.version, e)
            return entry
        self.stats["refreshes"] += 1
        self.entries[entry.task] = new
        return new

    def _load(self, task: str) -> TaskEntry:
        ref = f"{task}@{self.alias}"
        with fetched(self.settings, ref) as (path, info):
            try:
                model = load_adapter(path, self.backbone)
            except PetlError as e:
                self.stats["refused"] += 1
                err = ServeError(503, f"task {task!r} is unavailable: version {info['version']} refused: "
                                      f"{self._client_safe(str(e), path, ref)}")
                self.unavailable[task] = (err, time.monotonic())
                raise err from None
        self.unavailable.pop(task, None)
        self.stats["loads"] += 1
        classes = list(model.classes or [str(i) for i in range(model.num_classes)])  # set by load_adapter
        frozen = next(self.backbone.parameters())  # the replica's device and precision
        model.to(device=frozen.device, dtype=frozen.dtype)
        entry = TaskEntry(task, model, info["version"], model.method, classes,
                          measured_gflops(model, self.backbone.patch_embed.img_size, frozen.device, frozen.dtype),
                          checked_at=time.monotonic())
        if spec_of(model).runtime == "early_exit":
            entry.budget_thresholds = budget_thresholds(model, task, self.backbone)
        return entry

    def _client_safe(self, message: str, path, ref: str) -> str:
        """``message`` without this server's file paths: the adapter copy and the backbone file."""
        name = str(getattr(self.backbone, "petl_name", ""))
        message = message.replace(str(path), ref)
        return message.replace(name, Path(name).name) if os.sep in name else message


@contextmanager
def fetched(settings: TrackingSettings, ref: str):
    """``(path, version_info)`` of ``ref``'s adapter in a temporary directory that is deleted on exit
    (a loaded model holds its tensors in memory, so no copy outlives the load). 404 when the
    registry has no such model or alias, 503 when the registry or the artifact store fails: the
    store's own message (bucket, URL) goes to the log, not to the client."""
    tmp = tempfile.mkdtemp(prefix="petl-serve-")
    try:
        try:
            path, info = fetch_adapter(settings, ref, dst=tmp)
        except NotFoundError:
            task, alias = ref.split("@", 1)
            raise ServeError(404, f"task {task!r} has no registered version under alias {alias!r}") from None
        except PetlError as e:
            log.error("cannot fetch %s: %s", ref, e)
            raise ServeError(503, f"task {ref.split('@', 1)[0]!r} is unavailable: the model registry or artifact "
                                  "store did not answer; retry later") from None
        yield path, info
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(settings: TrackingSettings, task: str, alias: str = CHAMPION) -> dict:
    """The catalog row of ``task``: method and classes of the version ``alias`` points at (its
    ``adapter_config.json``), or ``{"task", "error"}`` with a client-safe message."""
    from ..tracking.artifacts import read_adapter_config

    ref = f"{task}@{alias}"
    try:
        with fetched(settings, ref) as (path, info):
            try:
                cfg = read_adapter_config(path)
            except PetlError as e:
                raise PetlError(str(e).replace(str(path), ref)) from None
    except PetlError as e:
        log.error("task %s is unavailable: %s", task, e)
        return {"task": task, "error": str(e)}
    return {"task": task, "method": cfg["method"], "alias": alias, "version": info["version"],
            "classes": cfg.get("classes")}
