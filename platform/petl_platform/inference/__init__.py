"""Inference: the mixed-task engine (rows of many tasks, any method, one pass over the frozen
weights) and the multi-task predictor on top of it (plain torch, no Ray). Offline scoring with Ray
Data (``petl predict``) runs this engine from ``cluster/batch.py``."""

from .engine import Engine, Row, RowResult
from .predictor import CallStats, MultiTaskPredictor, TrunkPlan

__all__ = ["CallStats", "Engine", "MultiTaskPredictor", "Row", "RowResult", "TrunkPlan"]
