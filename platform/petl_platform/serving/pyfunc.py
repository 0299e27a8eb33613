"""Every adapter directory is an MLflow Model: the ``python_function`` flavor of adapter artifacts.

``save_adapter`` (tracking/artifacts.py) writes an ``MLmodel`` next to ``adapter.safetensors`` and
``adapter_config.json`` (``tracking/mlmodel.py``), naming this module as its ``loader_module``, so
every registered version loads with MLflow alone::

    mlflow.pyfunc.load_model("models:/digits-1k@champion").predict([open("x.png", "rb").read()])

The flavor uses MLflow's ``loader_module`` mechanism, not a pickled ``python_model``: MLflow calls
``_load_pyfunc(<the adapter directory>)``, which builds the frozen backbone named in the config with
``create_backbone`` from shipped or local weights only (never a download; ``model_config={"backbone":
PATH}`` points it at weights stored elsewhere), refuses a backbone whose fingerprint differs from
the one the adapter was trained on (``load_adapter``'s check), and answers through the inference
engine with the training transform (``data.make_transform``), as the HTTP server does.

``predict`` takes (a) a list or 1-D array of encoded image bytes (PNG, JPEG, ...; base64 text too,
as ``mlflow models serve`` delivers a JSON string), (b) a numpy batch of raw pixels, transformed
here: RGB ``[N, H, W, 3]`` or grayscale ``[N, H, W]`` (a task's own arrays, e.g. digits-1k's; the
gray channel is replicated to RGB, as the HTTP server treats a gray PNG), of any integer dtype with
values in [0, 255] (a JSON array through ``mlflow models serve`` arrives as int64), (c) a numpy
batch ``[N, 3, H, W]`` float (already the model input), (d) a DataFrame with a column ``image`` of
bytes. It returns a DataFrame, one row per image: ``label`` (top-1 class name), ``probability``
(its softmax probability) and ``probabilities`` (every class, in the config's class order). The
signature records only the outputs: MLflow enforces an input schema before ``predict`` runs and
would refuse the numpy batches (b) and (c).
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from ..errors import PetlError
from ..tracking.mlmodel import INPUTS
from .request import ServeError, decode_image

def _load_pyfunc(data_path: str, model_config: dict | None = None) -> "AdapterPredictor":
    """MLflow's entry point: ``data_path`` is the adapter directory."""
    return AdapterPredictor(data_path, (model_config or {}).get("backbone"))


class AdapterPredictor:
    """One adapter on its frozen backbone, answering ``predict`` as the module docstring says."""

    def __init__(self, path, backbone: str | None = None):
        from ..tracking.artifacts import load_adapter, read_adapter_config
        from .stack import Stack

        cfg = read_adapter_config(path)
        name = backbone or cfg.get("backbone")
        if not name:
            raise PetlError(f"{path}: the adapter config names no backbone; load it with "
                            "model_config={'backbone': PATH_TO_WEIGHTS}")
        try:
            # pretrained=False: shipped or local weights, never a download; on the CPU (device=None)
            stack = Stack.build(name, device=None)
            self.model = load_adapter(path, stack.backbone)  # refuses a backbone with another fingerprint
        except PetlError as e:
            raise PetlError(f"cannot load adapter {cfg.get('task') or path} as an MLflow model: {e}. The backbone "
                            "must be the shipped one or local weights with the same fingerprint; pass "
                            "model_config={'backbone': PATH_TO_WEIGHTS} to mlflow.pyfunc.load_model to point "
                            "at them") from None
        self.task = cfg.get("task") or "adapter"
        self.classes = cfg.get("classes") or [str(i) for i in range(cfg["num_classes"])]
        self.engine, self.transform, self.image_size = stack.engine, stack.transform, stack.image_size

    def predict(self, model_input, params=None):
        """Images → DataFrame ``label``, ``probability``, ``probabilities``; ``params`` is unused."""
        import pandas as pd
        import torch

        from ..inference import Row

        x = self._batch(model_input)
        if len(x) == 0:
            return pd.DataFrame({"label": [], "probability": [], "probabilities": []})
        results = self.engine.run(x, [Row(i, self.task) for i in range(len(x))], {self.task: self.model})
        probs = torch.stack([r.logits for r in results]).float().softmax(-1)
        top = probs.max(-1)
        return pd.DataFrame({"label": [self.classes[i] for i in top.indices.tolist()],
                             "probability": top.values.double().tolist(),
                             "probabilities": [p.double().tolist() for p in probs]})

    # ------------------------------------------------------------------ inputs
    def _batch(self, data):
        import pandas as pd
        import torch

        if isinstance(data, pd.DataFrame):
            if "image" not in data.columns and len(data.columns) != 1:
                raise _bad_input(f"a DataFrame input needs a column 'image' of image bytes; got columns "
                                 f"{[str(c) for c in data.columns][:10]}")
            data = list(data["image"] if "image" in data.columns else data.iloc[:, 0])
        elif isinstance(data, pd.Series):
            data = list(data)
        elif isinstance(data, (bytes, bytearray, str)):
            data = [data]
        if isinstance(data, (list, tuple)) and all(isinstance(d, (bytes, bytearray, str)) for d in data):
            return self._decode(data)
        arr = np.asarray(data) if not isinstance(data, torch.Tensor) else data.cpu().numpy()
        if arr.ndim == 1 and arr.dtype.kind in "OSU":
            return self._decode(list(arr))
        pixels = _pixel_batch(arr)
        if pixels is not None:
            from PIL import Image

            if len(pixels) == 0:
                return torch.empty(0, 3, *self.image_size)
            # a 2-D uint8 array is an "L" image: convert("RGB") replicates it, as decode_image does a gray PNG
            return torch.stack([self.transform(Image.fromarray(im).convert("RGB")) for im in pixels])
        if arr.ndim == 4 and arr.shape[1] == 3 and arr.dtype.kind == "f":
            if tuple(arr.shape[2:]) != self.image_size:
                raise _bad_input(f"a float batch is the model input [N, 3, {self.image_size[0]}, "
                                 f"{self.image_size[1]}]; got shape {list(arr.shape)}: send integer [N, H, W, 3] "
                                 "or [N, H, W] pixels or image bytes to have them resized")
            return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        raise _bad_input(f"unsupported input {type(data).__name__} of shape {list(arr.shape)} and dtype {arr.dtype}: "
                         f"expected {INPUTS}")

    def _decode(self, items):
        import torch


        out = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                try:
                    item = base64.b64decode(item, validate=True)
                except (binascii.Error, ValueError):
                    raise _bad_input(f"image {i} of {len(items)} is text that is not base64: send image "
                                     "bytes, or base64 of them") from None
            try:
                out.append(decode_image(bytes(item), self.transform))
            except ServeError as e:
                raise _bad_input(f"image {i} of {len(items)}: {e}") from None
        return torch.stack(out)


def _pixel_batch(arr: np.ndarray) -> np.ndarray | None:
    """An integer pixel batch as uint8 ``[N, H, W, 3]`` (RGB) or ``[N, H, W]`` (gray; ``[N, H, W, 1]``
    too), whatever its integer dtype; ``None`` for an input of another kind. Values outside
    [0, 255] are refused rather than wrapped or clipped."""
    if arr.dtype.kind not in "iu":
        return None
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        raise _bad_input(f"a 3-D pixel array is a grayscale batch [N, H, W], but shape {list(arr.shape)} looks like "
                         "one color image: send a batch [N, H, W, 3] (e.g. [1, H, W, 3] for one image)")
    if not (arr.ndim == 3 or (arr.ndim == 4 and arr.shape[-1] == 3)):
        return None
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise _bad_input(f"pixel values must be integers in [0, 255]; got values from {arr.min()} to {arr.max()} "
                         f"({arr.dtype}): scale 16-bit or other ranges to 0-255 first")
    return arr.astype(np.uint8, copy=False)


def _bad_input(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
