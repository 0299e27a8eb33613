"""The Open Inference Protocol v2 (KServe / Triton), REST form: request parsing, response building
and model metadata, with Triton's binary tensor data extension. Ray-free and web-framework-free:
the Serve ingress reads the body and one header, and sends back what these functions return.

Wire format (what an unmodified ``tritonclient.http`` client sends and expects):

- A body is a JSON header, optionally followed by raw tensors. With the
  ``Inference-Header-Content-Length: N`` header the JSON is the first N bytes and the rest holds,
  in input order, the data of every input whose ``parameters.binary_data_size`` is set; the sizes
  must add up to the rest exactly.
- One image input per request, any name, told apart by datatype:
  ``BYTES`` shape ``[N]`` or ``[N, 1]``: encoded images (PNG, JPEG, ...). In binary form each element
  is a 4-byte little-endian length then the bytes; in JSON ``data`` each element is a **base64
  string** (as KServe clients send; Triton's raw-string form cannot carry PNG/JPEG bytes, which are
  not UTF-8). ``UINT8`` shape ``[N, H, W, C]``, C = 1 or 3: pixels, row-major, as ``N*H*W*C`` raw
  bytes or a flat or nested JSON list of integers 0..255.
- Request ``parameters`` ``budget``, ``threshold``, ``ratio``, ``top_k`` are the compute knobs
  (passed on as-is for ``request.parse_knobs``); ``binary_data_output`` is the default binary flag of
  every output; other parameters (``priority``, ``timeout``, ...) are ignored.
- Outputs: ``probabilities`` FP32 ``[N, classes]``; ``label`` BYTES ``[N]``; ``exit_stage`` INT32
  ``[N]`` (1-based, 0 for an image that ran without exits; sent only when an answer has one);
  ``compute`` BYTES ``[N]``, each a JSON object string (the answer's ``compute`` dict). Each is
  binary when its ``parameters.binary_data`` (else the request's ``binary_data_output``) is true.
  BYTES outputs in JSON are plain UTF-8 strings (they are text). No outputs named: all of them.
- Errors: ``ServeError`` with a 4xx and one line; ``error_response`` gives the ``{"error": ...}``
  body that tritonclient reads.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from .request import ServeError, safe_text

HEADER = "Inference-Header-Content-Length"
DATATYPES = ("BYTES", "UINT8")
OUTPUTS = ("probabilities", "label", "exit_stage", "compute")
KNOBS = ("budget", "threshold", "ratio", "top_k")
CHANNELS = (1, 3)
_INPUTS_HELP = "send BYTES (encoded images, shape [N]) or UINT8 (pixels, shape [N, H, W, C] with C = 1 or 3)"

Name = Annotated[StrictStr, Field(min_length=1)]
Dim = Annotated[StrictInt, Field(ge=0)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TensorParameters(BaseModel):
    """The per-tensor ``parameters`` this server reads; any other key is kept and ignored."""
    model_config = ConfigDict(extra="allow")
    binary_data_size: Annotated[StrictInt, Field(ge=0)] | None = None
    binary_data: StrictBool | None = None
    classification: StrictInt | None = None
    shared_memory_region: StrictStr | None = None


def _no_none(v):
    return {} if v is None else v


Params = Annotated[TensorParameters, BeforeValidator(_no_none)]  # "parameters": null reads as {}


class RequestInput(_Model):
    name: Name
    shape: list[Dim]
    datatype: StrictStr
    parameters: Params = Field(default_factory=TensorParameters)
    data: list[Any] | None = None

    @field_validator("datatype")
    @classmethod
    def _datatype(cls, v: str) -> str:
        if v not in DATATYPES:
            raise ValueError(f"datatype {v!r} is not accepted: {_INPUTS_HELP}")
        return v


class RequestOutput(_Model):
    name: Name
    parameters: Params = Field(default_factory=TensorParameters)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in OUTPUTS:
            raise ValueError(f"unknown output {v!r}: this model returns {', '.join(OUTPUTS)}")
        return v


class InferRequest(_Model):
    id: StrictStr | None = None
    parameters: Annotated[dict[str, Any], BeforeValidator(_no_none)] = Field(default_factory=dict)
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Model):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(_Model):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[ResponseOutput]


class MetadataTensor(_Model):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(_Model):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: dict[str, Any] | None = None


@dataclass
class InferCall:
    """A parsed inference request: exactly one of ``encoded`` and ``pixels`` is set."""
    id: str | None
    input_name: str
    encoded: list[bytes] | None  # encoded image files, for request.decode_image
    pixels: np.ndarray | None  # uint8 [N, H, W, C], C in CHANNELS
    params: dict  # the knobs the request gave, unchecked: run request.parse_knobs on them
    outputs: dict[str, bool]  # requested output -> binary?, in response order
    explicit_outputs: bool  # False: the client named none, so every output that applies

    @property
    def n(self) -> int:
        return len(self.encoded) if self.encoded is not None else int(self.pixels.shape[0])


# ---------------------------------------------------------------------------------------- requests
def parse_infer(body: bytes, header_length: str | None, *, max_images: int, max_pixels: int) -> InferCall:
    """The body of ``POST /v2/models/{name}/infer`` and its ``Inference-Header-Content-Length``
    header (``None`` when absent) → an ``InferCall``; ``ServeError`` 400/413 on anything else."""
    head, rest = _split(body, header_length)
    try:
        req = InferRequest.model_validate_json(head)
    except ValidationError as e:
        raise _invalid(e) from None
    chunks = _binary_chunks(req.inputs, rest, header_length is not None)
    if len(req.inputs) != 1:
        names = ", ".join(repr(i.name) for i in req.inputs[:4])
        raise ServeError(400, safe_text(f"send exactly one image input, got {len(req.inputs)}"
                                        + (f" ({names})" if names else "") + f": {_INPUTS_HELP}", 300))
    inp, raw = req.inputs[0], chunks[0]
    if inp.parameters.shared_memory_region is not None:
        raise ServeError(400, "shared-memory inputs are not supported: send the data in the request")
    encoded = pixels = None
    if inp.datatype == "BYTES":
        encoded = _bytes_input(inp, raw, max_images)
    else:
        pixels = _pixels_input(inp, raw, max_images, max_pixels)
    outputs, explicit = _outputs(req)
    params = {k: req.parameters[k] for k in KNOBS if k in req.parameters}
    return InferCall(req.id, inp.name, encoded, pixels, params, outputs, explicit)


def inflate(body: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """A request body sent with ``Content-Encoding: gzip`` or ``deflate`` (tritonclient's
    ``request_compression_algorithm``), inflated to at most ``max_bytes`` (413 past it: a zip bomb
    stops there, not in memory); 415 for another encoding, 400 for corrupt data."""
    coding = (content_encoding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding not in ("gzip", "deflate"):
        raise ServeError(415, safe_text(f"Content-Encoding {coding!r} is not supported: send gzip, deflate or "
                                        "identity", 200))
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, max_bytes + 1)  # one byte more than allowed tells "too big"
        if len(out) > max_bytes:
            raise ServeError(413, f"the inflated request body exceeds the limit of {max_bytes} bytes")
        if not inflater.eof:
            raise ServeError(400, f"the {coding} request body is truncated")
    except zlib.error:
        raise ServeError(400, f"the request body is not valid {coding} data") from None
    return out


def _split(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    text = str(header_length).strip()
    if not re.fullmatch(r"[+-]?[0-9]+", text):
        raise ServeError(400, safe_text(f"{HEADER} must be an integer (the JSON header's length in bytes), "
                                        f"got {text!r}", 200))
    n = int(text)
    if n < 0:
        raise ServeError(400, f"{HEADER} must not be negative, got {n}")
    if n > len(body):
        raise ServeError(400, f"{HEADER} is {n} but the body has only {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:n]), view[n:]


def _invalid(e: ValidationError) -> ServeError:
    """A pydantic error → one line, with where and what, and never the offending value itself."""
    errors = e.errors(include_url=False, include_input=False, include_context=True)
    first = errors[0]
    if first["type"] == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "not JSON")
        return ServeError(400, safe_text(f"malformed JSON in the inference request: {why} (binary tensor data "
                                         f"needs the {HEADER} header)", 300))
    loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".") or "request"
    msg = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return ServeError(400, safe_text(f"invalid inference request: {loc}: {msg}{more}", 300))


def _binary_chunks(inputs: list[RequestInput], rest: memoryview, has_header: bool) -> list[memoryview | None]:
    """Each input's slice of the binary section (None for JSON data); the sizes must add up."""
    chunks, offset = [], 0
    for inp in inputs:
        size = inp.parameters.binary_data_size
        if size is None:
            if inp.data is None and inp.parameters.shared_memory_region is None:
                raise ServeError(400, safe_text(f"input {inp.name!r} has neither data nor "
                                                "parameters.binary_data_size", 200))
            chunks.append(None)
            continue
        if inp.data is not None:
            raise ServeError(400, safe_text(f"input {inp.name!r} has both JSON data and binary_data_size: "
                                            "send one", 200))
        if not has_header:
            raise ServeError(400, safe_text(f"input {inp.name!r} has binary_data_size but the request has no "
                                            f"{HEADER} header", 200))
        chunks.append(rest[offset:offset + size])
        offset += size
    if offset != len(rest):
        raise ServeError(400, f"the binary data after the JSON header is {len(rest)} bytes but the inputs' "
                              f"binary_data_size add up to {offset}: check {HEADER} and binary_data_size")
    return chunks


def _count(n: int, max_images: int) -> None:
    if n < 1:
        raise ServeError(400, "the image input holds no images: send at least one")
    if n > max_images:
        raise ServeError(413, f"{n} images in one request exceed the limit of {max_images}: split the batch")


def _shape(shape: list[int]) -> str:
    return safe_text("[" + ", ".join(map(str, shape[:8])) + (", ..." if len(shape) > 8 else "") + "]", 80)


def _bytes_input(inp: RequestInput, raw: memoryview | None, max_images: int) -> list[bytes]:
    shape = inp.shape
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise ServeError(400, f"a BYTES image input has shape [N] or [N, 1], got {_shape(shape)}")
    n = shape[0]
    _count(n, max_images)
    if raw is not None:
        return _unpack_bytes(raw, n)
    items = _flatten(inp.data, depth=len(shape))
    if len(items) != n:
        raise ServeError(400, f"shape {_shape(shape)} says {n} images but data holds {len(items)}")
    out = []
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise ServeError(400, f"BYTES data element {i} is a {type(s).__name__}: JSON image data are base64 "
                                  "strings of the image files (or send them as binary data)")
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise ServeError(400, f"BYTES data element {i} is not valid base64: JSON image data are base64 "
                                  "strings of the image files (or send them as binary data)") from None
    return out


def _flatten(data: list, depth: int) -> list:
    """Nested JSON lists (at most ``depth`` deep) → a flat list; deeper nesting is left for the
    element check to refuse."""
    if depth <= 1:
        return data
    return [y for x in data for y in (_flatten(x, depth - 1) if isinstance(x, list) else [x])]


def _unpack_bytes(raw: memoryview, n: int) -> list[bytes]:
    """Triton's binary BYTES form: each element is a 4-byte little-endian length, then the bytes."""
    items, offset, size = [], 0, len(raw)
    while offset < size and len(items) <= n:  # stop early: a flood of empty elements costs nothing
        if offset + 4 > size:
            raise ServeError(400, f"binary BYTES data is truncated: element {len(items)} has no 4-byte length")
        (k,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + k > size:
            raise ServeError(400, f"binary BYTES element {len(items)} claims {k} bytes but only "
                                  f"{size - offset} remain in its binary_data_size")
        items.append(bytes(raw[offset:offset + k]))
        offset += k
    if len(items) != n:
        held = f"more than {n}" if len(items) > n else len(items)
        raise ServeError(400, f"shape says {n} images but the binary BYTES data holds {held}")
    return items


def _pixels_input(inp: RequestInput, raw: memoryview | None, max_images: int, max_pixels: int) -> np.ndarray:
    shape = inp.shape
    if len(shape) != 4:
        raise ServeError(400, f"a UINT8 image input has shape [N, H, W, C] with C = 1 or 3, got {_shape(shape)}")
    n, h, w, c = shape
    _count(n, max_images)
    if c not in CHANNELS:
        raise ServeError(400, f"a UINT8 image input has 1 (gray) or 3 (RGB) channels last, got C = {c}")
    if h == 0 or w == 0:
        raise ServeError(400, f"UINT8 images of {h}x{w} pixels are empty")
    if n * h * w > max_pixels:  # before the data are touched
        raise ServeError(413, f"{n} images of {h}x{w} = {n * h * w} pixels exceed the limit of {max_pixels} "
                              "pixels per request: resize or split the batch")
    expected = math.prod(shape)
    if raw is not None:
        if len(raw) != expected:
            raise ServeError(400, f"shape {_shape(shape)} needs {expected} bytes of UINT8 data, "
                                  f"binary_data_size is {len(raw)}")
        return np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()  # copy: writable, owns its memory
    try:
        a = np.asarray(inp.data)
    except (ValueError, TypeError):
        raise ServeError(400, "UINT8 data must be a flat or evenly nested list of integers 0..255") from None
    if a.size != expected:
        raise ServeError(400, f"shape {_shape(shape)} needs {expected} values but data holds {a.size}")
    if a.dtype.kind not in "iu":
        raise ServeError(400, "UINT8 data must be integers 0..255 (no floats, strings, booleans or nulls)")
    if a.min() < 0 or a.max() > 255:
        raise ServeError(400, f"UINT8 data must be integers 0..255, got values from {a.min()} to {a.max()}")
    return a.astype(np.uint8).reshape(shape)


def _outputs(req: InferRequest) -> tuple[dict[str, bool], bool]:
    default = req.parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise ServeError(400, "parameters.binary_data_output must be true or false")
    if not req.outputs:  # none named (tritonclient then sets binary_data_output): all of them
        return dict.fromkeys(OUTPUTS, default), False
    out = {}
    for o in req.outputs:
        if o.parameters.classification is not None:
            raise ServeError(400, "the classification extension is not supported: request the "
                                  "probabilities and label outputs")
        if o.parameters.shared_memory_region is not None:
            raise ServeError(400, "shared-memory outputs are not supported: take the outputs in the response")
        if o.name in out:
            raise ServeError(400, f"output {o.name!r} is requested twice")
        out[o.name] = default if o.parameters.binary_data is None else o.parameters.binary_data
    return out, True


# --------------------------------------------------------------------------------------- responses
def infer_response(model: str, version: str | None, answers: list[dict], classes: list[str] | None,
                   call: InferCall) -> tuple[bytes, dict]:
    """The response body and headers for ``answers`` (one per image, as the server produces them).
    Any binary output: JSON header + raw tensors, ``application/octet-stream`` and
    ``Inference-Header-Content-Length``; else plain ``application/json``."""
    if len(answers) != call.n:
        raise ValueError(f"{len(answers)} answers for {call.n} images")
    outputs, blobs = [], []
    for name, binary in call.outputs.items():
        tensor = _tensor(name, answers, classes)
        if tensor is None:
            continue
        datatype, shape, values = tensor
        if binary:
            blob = _to_binary(datatype, values)
            blobs.append(blob)
            outputs.append(ResponseOutput(name=name, datatype=datatype, shape=shape,
                                          parameters={"binary_data_size": len(blob)}))
        else:
            outputs.append(ResponseOutput(name=name, datatype=datatype, shape=shape, data=_to_json(datatype, values)))
    resp = InferResponse(model_name=model, model_version=None if version is None else str(version), id=call.id,
                         outputs=outputs)
    head = resp.model_dump_json(exclude_none=True).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return b"".join([head, *blobs]), {"content-type": "application/octet-stream", HEADER: str(len(head))}


def _tensor(name: str, answers: list[dict], classes: list[str] | None):
    n = len(answers)
    if name == "probabilities":
        p = np.stack([_float32(a["probabilities"]) for a in answers])
        if classes is not None and p.shape[1] != len(classes):
            raise ValueError(f"probabilities over {p.shape[1]} classes for a model of {len(classes)}")
        return "FP32", [n, p.shape[1]], p
    if name == "label":
        return "BYTES", [n], [str(a["label"]).encode() for a in answers]
    if name == "exit_stage":
        stages = [a.get("exit_stage") for a in answers]
        if all(s is None for s in stages):
            return None  # the task does not exit early
        return "INT32", [n], np.array([0 if s is None else int(s) for s in stages], dtype=np.int32)
    if name == "compute":
        return "BYTES", [n], [json.dumps(a.get("compute") or {}, separators=(",", ":"), default=_plain).encode()
                              for a in answers]
    raise ValueError(f"unknown output {name!r}")


def _float32(p) -> np.ndarray:
    if hasattr(p, "detach"):  # a torch tensor
        p = p.detach().float().cpu().numpy()
    return np.asarray(p, dtype=np.float32).reshape(-1)


def _plain(v):
    """JSON for numpy / torch scalars in a ``compute`` dict."""
    if hasattr(v, "item"):
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serializable")


def _to_binary(datatype: str, values) -> bytes:
    if datatype == "BYTES":
        return b"".join(struct.pack("<I", len(v)) + v for v in values)
    return np.ascontiguousarray(values, dtype="<f4" if datatype == "FP32" else "<i4").tobytes()


def _to_json(datatype: str, values) -> list:
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") for v in values]
    return np.asarray(values).reshape(-1).tolist()  # float32 → the float64 that prints it exactly


def error_response(err: ServeError) -> tuple[int, bytes, dict]:
    """Status, body and headers of an error, in the ``{"error": message}`` form tritonclient reads."""
    return err.status, json.dumps({"error": safe_text(str(err), 300)}).encode(), {"content-type": "application/json"}


# ---------------------------------------------------------------------------------------- metadata
def model_metadata(task: str, row: dict, image_size: tuple[int, int], classes: list[str] | int | None = None) -> dict:
    """``GET /v2/models/{task}[/versions/{v}]``: a catalog row → the OIP model metadata. ``classes``
    (names or a count) when the row lacks them; -1 in the shape when neither says."""
    classes = classes if classes is not None else row.get("classes")
    n = classes if isinstance(classes, int) else len(classes) if classes else -1
    method = row.get("method") or "unknown"
    outputs = [MetadataTensor(name="probabilities", datatype="FP32", shape=[-1, n]),
               MetadataTensor(name="label", datatype="BYTES", shape=[-1])]
    if row.get("runtime") == "early_exit":
        outputs.append(MetadataTensor(name="exit_stage", datatype="INT32", shape=[-1]))
    outputs.append(MetadataTensor(name="compute", datatype="BYTES", shape=[-1]))
    h, w = image_size
    meta = ModelMetadata(
        name=task, versions=[] if row.get("version") is None else [str(row["version"])], platform=f"petl_{method}",
        inputs=[MetadataTensor(name="image", datatype="BYTES", shape=[-1]),
                MetadataTensor(name="pixels", datatype="UINT8", shape=[-1, -1, -1, 3])],
        outputs=outputs,
        parameters={"method": method, "image_size": [int(h), int(w)],
                    "inputs": "send exactly one: image (encoded PNG/JPEG/WebP/GIF/BMP/TIFF files; base64 strings "
                              "in JSON) or pixels (UINT8 [N, H, W, C], C = 1 or 3); both are resized to image_size",
                    "request_parameters": ", ".join(KNOBS)})
    return meta.model_dump(exclude_none=True)
