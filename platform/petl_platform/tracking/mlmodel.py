"""The ``MLmodel`` of an adapter directory: every adapter is an MLflow Model of the
``python_function`` flavor, loaded through ``loader_module`` (``serving/pyfunc.py``, which holds
the predictor). Writing it needs MLflow only: saving an adapter never imports the engine."""

from __future__ import annotations

import sys
from pathlib import Path

LOADER_MODULE = "petl_platform.serving.pyfunc"  # MLmodel files of earlier versions name tracking.pyfunc: a shim
MLMODEL = "MLmodel"
INPUTS = ("list of encoded image bytes; numpy pixels [N,H,W,3] (RGB) or [N,H,W] (gray), any integer dtype "
          "in 0-255; numpy [N,3,H,W] float (model input); DataFrame with a bytes column 'image'")


def write_mlmodel(path: Path, config: dict) -> None:
    """Write ``MLmodel``, ``python_env.yaml`` and ``requirements.txt`` into adapter directory
    ``path`` (its data path is the directory itself)."""
    import mlflow.pyfunc
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    from ..version import __version__

    v = sys.version_info
    (path / "requirements.txt").write_text(f"mlflow=={mlflow.__version__}\npetl-platform=={__version__}\n")
    (path / "python_env.yaml").write_text(f"python: {v.major}.{v.minor}.{v.micro}\nbuild_dependencies:\n- pip\n"
                                          "dependencies:\n- -r requirements.txt\n")
    model = Model(metadata={"petl_method": config["method"], "petl_task": config.get("task"),
                            "petl_backbone": config.get("backbone"), "petl_inputs": INPUTS})
    mlflow.pyfunc.add_to_model(model, loader_module=LOADER_MODULE, data=".", python_env="python_env.yaml")
    model.signature = ModelSignature(outputs=Schema([
        ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability"),
        ColSpec(Array(DataType.double), "probabilities")]))
    model.save(str(path / MLMODEL))
