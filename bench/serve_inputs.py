"""What the serving bench sends and what it compares against: the same images for every figure
(digits-1k test images, as PNG bytes and as uint8 pixels at the model's input size), request
bodies for both protocols built once, and the in-process engine on the same task and images.

- ``oip_body``: an Open Inference Protocol v2 infer request in the binary tensor data extension,
  built by tritonclient (a real client's bytes); ``v1_body``: a ``/v1/predict`` JSON body.
- ``InProcess``: the engine in the bench process on the registered task's adapter (loaded from the
  registry by the adapter store, as a replica loads it), timed on uint8 pixels (normalization
  counted), on PNG bytes (decode + transform counted) and at batch 1.
"""

from __future__ import annotations

import base64
import io
import json
import statistics
import time

import numpy as np

N_IMAGES = 16


def images(backbone, n: int = N_IMAGES) -> tuple[list[bytes], np.ndarray]:
    """The first ``n`` digits-1k test images: PNG bytes (their own size) and uint8 [n, H, W, 3] pixels
    at the model's input size, resized as the server resizes them (``data.Pixels``)."""
    from PIL import Image

    from petl_platform.data import Pixels, get_task

    px = Pixels.of(backbone)
    pngs, pixels = [], []
    for im in get_task("digits-1k").splits["test"][0][:n]:
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="PNG")
        pngs.append(buf.getvalue())
        pixels.append(px.to_uint8(Image.fromarray(im)).permute(1, 2, 0).numpy())
    return pngs, np.stack(pixels)


def oip_body(pixels: np.ndarray, parameters: dict | None = None) -> tuple[bytes, dict]:
    """(body, headers) of ``POST /v2/models/{task}/infer``: input ``pixels`` UINT8 [N, H, W, 3] as raw
    bytes after the JSON header, output ``probabilities`` asked in binary, ``parameters`` the knobs."""
    try:
        from tritonclient.http import InferInput, InferRequestedOutput
        from tritonclient.http._utils import _get_inference_request
    except ImportError:
        raise SystemExit("serve bench: the OIP figures need tritonclient: pip install 'tritonclient[http]'") from None
    inp = InferInput("pixels", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(np.ascontiguousarray(pixels, dtype=np.uint8), binary_data=True)
    body, json_size = _get_inference_request(
        inputs=[inp], request_id="", outputs=[InferRequestedOutput("probabilities", binary_data=True)], sequence_id=0,
        sequence_start=False, sequence_end=False, priority=0, timeout=None, custom_parameters=parameters)
    return body, {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)}


def v1_body(pngs: list[bytes], tasks: list[str], **knobs) -> tuple[bytes, dict]:
    """(body, headers) of ``POST /v1/predict`` in JSON: one image as ``image``, several as ``images``."""
    b64 = [base64.b64encode(p).decode() for p in pngs]
    doc = {"image": b64[0]} if len(b64) == 1 else {"images": b64}
    return json.dumps({**doc, "tasks": tasks, **knobs}).encode(), {"Content-Type": "application/json"}


def _rate(call, items: int, seconds: float, warm: int = 3) -> float:
    for _ in range(warm):
        call()
    calls, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds or calls < 3:
        call()
        calls += 1
    return calls * items / elapsed


class InProcess:
    """The mixed-task engine in this process on ``task`` (from the registry via the adapter store)."""

    def __init__(self, settings, task: str, backbone: str, dtype: str | None = None):
        import torch

        from petl_platform.serving import Stack

        self.stack = Stack.build(backbone, dtype=dtype)
        store = self.stack.store(settings, capacity=2)
        self.model = store.get(task, timeout=120).model
        store.close()
        self.task = task
        self.threads = torch.get_num_threads()

    def _answer(self, x):
        import torch

        from petl_platform.inference import Row

        results = self.stack.engine.run(x, [Row(i, self.task) for i in range(len(x))], {self.task: self.model})
        return torch.stack([r.logits for r in results]).float().softmax(-1)

    @staticmethod
    def _from_u8(pixels: np.ndarray):
        """uint8 [N, 3, H, W]: the engine normalizes it, as on a replica."""
        import torch

        return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()

    def _from_png(self, pngs: list[bytes]):
        import torch

        from petl_platform.serving.request import decode_image

        return torch.stack([decode_image(p, self.stack.transform) for p in pngs])

    @staticmethod
    def _batch(items, batch: int):
        return [items[i % len(items)] for i in range(batch)]

    def u8_img_s(self, pixels: np.ndarray, batch: int, seconds: float) -> float:
        """img/s on uint8 [N, H, W, 3] pixels at the model size: normalization (in the engine) + engine + softmax."""
        x = np.stack(self._batch(list(pixels), batch))
        return _rate(lambda: self._answer(self._from_u8(x)), batch, seconds)

    def png_img_s(self, pngs: list[bytes], batch: int, seconds: float) -> float:
        """img/s on PNG bytes: decode + transform + engine + softmax."""
        items = self._batch(pngs, batch)
        return _rate(lambda: self._answer(self._from_png(items)), batch, seconds)

    def png_b1_ms(self, pngs: list[bytes], seconds: float) -> float:
        """Median ms of one batch-1 call on one PNG (decode + transform + engine + softmax)."""
        for p in pngs[:3]:
            self._answer(self._from_png([p]))
        times, t0, i = [], time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds or len(times) < 5:
            t = time.perf_counter()
            self._answer(self._from_png([pngs[i % len(pngs)]]))
            times.append(time.perf_counter() - t)
            i += 1
        return 1e3 * statistics.median(times)


def bare_bf16_img_s(backbone: str, batch: int, seconds: float) -> float:
    """G1's reference: the bare backbone's forward in bf16 on the GPU at ``batch``."""
    import torch

    from petl_platform import create_backbone

    bb = create_backbone(backbone).to("cuda", torch.bfloat16).eval()
    x = torch.randn(batch, 3, *bb.patch_embed.img_size, device="cuda", dtype=torch.bfloat16)

    def call():
        with torch.inference_mode():
            bb(x)
        torch.cuda.synchronize()

    return _rate(call, batch, seconds, warm=10)
