"""What ``petl serve`` can serve, decided before any cluster starts: each requested task is looked
up in the MLflow registry under the config's alias (the same lookup as ``GET /v1/tasks``), one line
per task. No Ray here: the check runs in the CLI process."""

from __future__ import annotations

import fnmatch
import logging
from contextlib import contextmanager

from ..errors import PetlError
from ..tracking.settings import CHAMPION, TrackingSettings


def requested(config: str, tasks: str | None) -> tuple[list[str], str, str | None, str | None]:
    """``(tasks, alias, task_pattern, task_tag)`` a Serve YAML names: ``--tasks`` (comma-separated)
    over the first application's ``args.tasks``, in order, without repeats (maybe none: the app then
    serves every task registered with the alias, on demand); the alias and the catalog's filters
    from ``args``."""
    import yaml

    try:
        with open(config) as f:
            apps = (yaml.safe_load(f) or {}).get("applications") or [{}]
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise PetlError(f"cannot read the Serve config {config}: {e}") from None
    args = apps[0].get("args") or {}
    names = tasks or args.get("tasks") or []
    names = [t.strip() for t in (names.split(",") if isinstance(names, str) else names)]
    return (list(dict.fromkeys(t for t in names if t)), str(args.get("alias") or CHAMPION),
            args.get("task_pattern"), args.get("task_tag"))


@contextmanager
def _quiet(name: str):
    """describe() logs each failure for the server's operator; here the reason is printed instead."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def lookup(settings: TrackingSettings, tasks: list[str], alias: str = CHAMPION, pattern: str | None = None,
           tag: str | None = None) -> list[dict]:
    """One catalog row per task (``serving.models.describe``): ``{"task", "method", "version", ...}``
    when the alias resolves to a readable adapter and the server's filters (``task_pattern``,
    ``task_tag``, as the catalog applies them) select it, else ``{"task", "error"}``."""
    from . import models
    from .catalog import Catalog

    selector = Catalog(settings, alias, pattern, tag)  # no refresh thread: only its filters
    rows = []
    with _quiet(models.__name__):
        for task in tasks:
            row = models.describe(settings, task, alias)
            if "error" not in row and (pattern or tag):
                why = _filtered_out(settings, selector, task)
                if why:
                    row = {"task": task, "error": why}
            rows.append(row)
    return rows


def _filtered_out(settings: TrackingSettings, selector, task: str) -> str | None:
    """Why the server's filters leave ``task`` out, or None when they select it."""
    tags = {}
    if selector.tag is not None:
        from ..tracking.runs import client

        tags = client(settings).get_registered_model(task).tags or {}
    if selector.selects(task, tags):
        return None
    if selector.pattern and not fnmatch.fnmatchcase(task, selector.pattern):
        return f"the config's task_pattern {selector.pattern!r} does not match it"
    return f"its registered model has no tag {'='.join(selector.tag)} (the config's task_tag)"


def lines(rows: list[dict]) -> list[str]:
    """``servable: digits-1k (lora v3)`` / ``not servable: fashion_mnist-1k: <reason>``."""
    return [f"not servable: {r['task']}: {r['error']}" if "error" in r else
            f"servable: {r['task']} ({r['method']} v{r['version']})" for r in rows]


def check(settings: TrackingSettings, tasks: list[str], alias: str = CHAMPION, pattern: str | None = None,
          tag: str | None = None, echo=print) -> list[dict]:
    """Print a line per task; ``PetlError`` (one line) when none of them is servable."""
    if not tasks:  # nothing named to check: the catalog decides on each request
        echo(f"no tasks named: every task registered with alias {alias!r} is servable on demand")
        return []
    rows = lookup(settings, tasks, alias, pattern, tag)
    for line in lines(rows):
        echo(line)
    if all("error" in r for r in rows):
        raise PetlError("none of the requested tasks is servable; register one with "
                        f"`petl sweep --task TASK --method METHOD` (alias {alias!r}) or point the alias at a "
                        f"version with `petl registry promote TASK VERSION --alias {alias}` "
                        "(registry: $MLFLOW_TRACKING_URI)")
    return rows
