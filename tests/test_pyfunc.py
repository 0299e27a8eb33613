"""Every registered adapter is a native MLflow Model: ``mlflow.pyfunc.load_model("models:/NAME@champion")``
on the real stack (MLflow on SQLite, artifacts in moto's S3 server) answers what the in-process model
answers, refuses another backbone, and says what is wrong with a bad image."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch

from petl_platform.errors import PetlError
from platform_stack import platform_stack

CLASSES = ["a", "b", "c"]
pytestmark = pytest.mark.slow  # the S3 server, MLflow and a registered adapter: ~6 s


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from petl_platform import create_backbone
    from petl_platform.methods import build_model
    from petl_platform.tracking.runs import log_and_register

    with platform_stack(tmp_path_factory.mktemp("pyfunc")) as st:
        bb = create_backbone(st["backbone"])  # the weights file: the flavor rebuilds it from the same path
        torch.manual_seed(3)
        model = build_model("lora", bb, len(CLASSES), rank=2)
        with torch.no_grad():  # non-zero LoRA deltas and head: every row's answer depends on the adapter
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)
        mv = log_and_register(st["settings"], model, "tiny-task", CLASSES,
                              metrics={"val_accuracy": 0.75, "test_accuracy": float("nan")})
        yield {**st, "bb": bb, "mv": mv}


@pytest.fixture(scope="module")
def loaded(stack):
    import mlflow.pyfunc

    return mlflow.pyfunc.load_model("models:/tiny-task@champion")  # MLFLOW_TRACKING_URI from the stack


def _pixels(n: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _png(a: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def _reference(stack, pixels: np.ndarray) -> torch.Tensor:
    """The in-process answer: the registered adapter loaded with load_adapter, run directly."""
    from PIL import Image

    from petl_platform.data import make_transform
    from petl_platform.tracking.artifacts import load_adapter
    from petl_platform.tracking.runs import fetch_adapter

    path, _ = fetch_adapter(stack["settings"], "tiny-task@champion")
    model = load_adapter(path, stack["bb"])
    tf = make_transform(stack["bb"])
    x = torch.stack([tf(Image.fromarray(a).convert("RGB")) for a in pixels])
    with torch.no_grad():
        return model(x).softmax(-1)


@pytest.mark.parametrize("kind", ["png_list", "uint8_batch", "dataframe", "float_batch"])
def test_pyfunc_predicts_what_the_in_process_model_does(stack, loaded, kind):
    import pandas as pd

    from petl_platform.data import make_transform

    pixels = _pixels(5)
    want = _reference(stack, pixels)
    if kind == "png_list":
        inputs = [_png(a) for a in pixels]
    elif kind == "uint8_batch":
        inputs = pixels
    elif kind == "dataframe":
        inputs = pd.DataFrame({"image": [_png(a) for a in pixels]})
    else:  # already the model input
        from PIL import Image
        tf = make_transform(stack["bb"])
        inputs = torch.stack([tf(Image.fromarray(a)) for a in pixels]).numpy()
    got = loaded.predict(inputs)
    assert list(got.columns) == ["label", "probability", "probabilities"] and len(got) == 5
    probs = torch.tensor(np.stack(got["probabilities"].to_list()))
    assert torch.allclose(probs, want.double(), atol=1e-5)
    assert got["label"].to_list() == [CLASSES[i] for i in want.argmax(-1).tolist()]
    assert np.allclose(got["probability"].to_numpy(), want.max(-1).values.numpy(), atol=1e-5)
    assert len(set(got["label"])) > 1 or want.std(0).sum() > 1e-3  # the rows really differ


def test_registered_run_records_params_and_metrics(stack):
    from petl_platform.tracking.runs import client

    run = client(stack["settings"]).get_run(stack["mv"].run_id)
    assert run.data.params["method"] == "lora" and run.data.params["hparams.rank"] == "2"
    assert int(run.data.params["num_trainable"]) > 0
    assert run.data.metrics == {"val_accuracy": 0.75}  # the NaN test accuracy is skipped, not logged


def test_a_tampered_fingerprint_is_refused(stack, tmp_path):
    import mlflow.artifacts
    import mlflow.pyfunc

    path = mlflow.artifacts.download_artifacts("models:/tiny-task@champion", dst_path=str(tmp_path / "dl"))
    tampered = shutil.copytree(path, tmp_path / "tampered")
    assert (tampered / "MLmodel").exists()  # the version's whole directory is the MLflow Model
    cfg = json.loads((tampered / "adapter_config.json").read_text())
    cfg["backbone_fingerprint"] = "0" * len(cfg["backbone_fingerprint"])
    (tampered / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(PetlError, match=r"cannot load adapter tiny-task as an MLflow model: .*fingerprint"):
        mlflow.pyfunc.load_model(str(tampered))


def test_bad_inputs_get_a_clear_error(loaded):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"image 1 of 2: not a readable image"):
        loaded.predict([_png(_pixels(1)[0]), b"certainly not a PNG"])
    with pytest.raises(MlflowException, match=r"unsupported input .*shape \[2, 7\]"):
        loaded.predict(np.zeros((2, 7), np.float32))


def _probs(frame) -> torch.Tensor:
    return torch.tensor(np.stack(frame["probabilities"].to_list()))


def test_grayscale_and_int64_pixel_batches_answer_as_their_uint8_rgb_equivalent(stack, loaded):
    """A task's own arrays (digits-1k: [N, 8, 8] uint8 gray) and integer pixels of another dtype (a
    JSON array arrives as int64) answer what the uint8 RGB batch answers, and what a gray PNG does."""
    from PIL import Image

    gray = np.random.default_rng(1).integers(0, 256, (6, 8, 8), dtype=np.uint8)  # digits-1k-like
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    want = loaded.predict(rgb)
    gray_pngs = []
    for a in gray:
        buf = io.BytesIO()
        Image.fromarray(a, "L").save(buf, format="PNG")  # the HTTP decoder's gray image
        gray_pngs.append(buf.getvalue())
    for inputs in (gray, gray.astype(np.int64), gray[..., None], rgb.astype(np.int64), rgb.astype(np.int32),
                   torch.from_numpy(gray.astype(np.int64)), gray_pngs):
        got = loaded.predict(inputs)
        assert torch.allclose(_probs(got), _probs(want), atol=1e-6)
        assert got["label"].to_list() == want["label"].to_list()
    assert len(loaded.predict(np.zeros((0, 8, 8), np.int64))) == 0


def test_a_json_pixel_array_through_the_scoring_server_is_answered(loaded):
    """What `mlflow models serve` does with {"inputs": [[[...]]]}: the JSON ints arrive as int64."""
    from mlflow.pyfunc.scoring_server import invocations

    gray = np.random.default_rng(2).integers(0, 256, (2, 8, 8), dtype=np.uint8)
    for pixels in (gray, _pixels(2)):
        resp = invocations(json.dumps({"inputs": pixels.tolist()}), "application/json", loaded, None)
        assert resp.status == 200, resp.response
        got = json.loads(resp.response)["predictions"]
        want = loaded.predict(pixels)
        assert [r["label"] for r in got] == want["label"].to_list()


def test_bad_pixel_arrays_get_a_clear_error(loaded):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException, match=r"pixel values must be integers in \[0, 255\]; got values from 0 to 256"):
        loaded.predict(np.full((1, 8, 8), 256, np.int64) * np.eye(8, dtype=np.int64))
    with pytest.raises(MlflowException, match=r"got values from -1 to"):
        loaded.predict(np.full((1, 8, 8, 3), -1, np.int64))
    with pytest.raises(MlflowException, match=r"looks like one color image: send a batch \[N, H, W, 3\]"):
        loaded.predict(_pixels(1)[0])
