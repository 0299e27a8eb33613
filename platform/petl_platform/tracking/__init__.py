"""MLflow + S3 tracking, adapter artifacts, registry aliases."""

from .artifacts import load_adapter, read_adapter_config, save_adapter

__all__ = ["load_adapter", "read_adapter_config", "save_adapter"]
