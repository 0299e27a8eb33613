"""Serving without Ray: request validation and decoding, API keys, the per-replica cache of task
models loaded from the MLflow registry by alias, and the one assembly of backbone, engine and
transform every server holds (``Stack``). ``serve_apps/`` wires these into Ray Serve."""

from .auth import ApiKeys
from .batcher import Batcher
from .models import TaskModelCache
from .request import ServeError, answer, decode_image, parse_knobs
from .stack import Stack

__all__ = ["ApiKeys", "Batcher", "ServeError", "TaskModelCache", "answer", "decode_image", "parse_knobs", "Stack"]
