"""Compatibility: ``MLmodel`` files written before the pyfunc flavor moved to ``serving/pyfunc.py``
name this module as their ``loader_module``. MLflow calls ``_load_pyfunc`` here; it hands over to the
flavor, imported when a model loads (tracking sits below serving, so never at import time)."""

from __future__ import annotations

import importlib

FLAVOR = "petl_platform.serving.pyfunc"


def _load_pyfunc(data_path: str, model_config: dict | None = None):
    """MLflow's entry point for an adapter directory saved by an earlier version."""
    return importlib.import_module(FLAVOR)._load_pyfunc(data_path, model_config)
