"""Inference: the mixed-task engine (rows of many tasks, any method, one pass over the frozen
weights) and the multi-task predictor on top of it (plain torch, no Ray); ``predict_dataset``
scores a folder or S3 prefix of images offline with Ray Data (Ray imported only when it runs)."""

from .batch import predict_dataset
from .engine import Engine, Row, RowResult
from .predictor import CallStats, MultiTaskPredictor, TrunkPlan

__all__ = ["CallStats", "Engine", "MultiTaskPredictor", "Row", "RowResult", "TrunkPlan", "predict_dataset"]
