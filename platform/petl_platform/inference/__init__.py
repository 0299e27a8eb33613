"""Inference: shared-trunk multi-task prediction over one frozen backbone (plain torch)."""

from .predictor import CallStats, MultiTaskPredictor, TrunkPlan

__all__ = ["CallStats", "MultiTaskPredictor", "TrunkPlan"]
