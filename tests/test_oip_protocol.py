"""The Open Inference Protocol v2 layer (serving/oip.py) against the wire format of the real
``tritonclient.http``: request bodies built by its own ``_get_inference_request``, responses read
back by its own ``InferResult``."""

from __future__ import annotations

import base64
import gzip
import json
import struct
import zlib

import numpy as np
import pytest
import tritonclient.http as th  # the test extra installs it
from petl_platform.serving.oip import (
    HEADER,
    error_response,
    infer_response,
    inflate,
    model_metadata,
    parse_infer,
)
from petl_platform.serving.request import ServeError

_get_inference_request = th._utils._get_inference_request

LIMITS = {"max_images": 8, "max_pixels": 10_000}
CLASSES = ["cat", "dog", "owl"]


def request(inputs, outputs=None, request_id="", parameters=None):
    """Body and header value exactly as ``InferenceServerClient.infer`` sends them."""
    body, json_size = _get_inference_request(inputs=inputs, request_id=request_id, outputs=outputs, sequence_id=0,
                                             sequence_start=False, sequence_end=False, priority=0, timeout=None,
                                             custom_parameters=parameters)
    return body, None if json_size is None else str(json_size)


def tensor(name, array, datatype, binary):
    t = th.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def parse(body, header=None, **limits):
    return parse_infer(body, header, **{**LIMITS, **limits})


def refused(status, body, header=None, **limits) -> str:
    with pytest.raises(ServeError) as e:
        parse(body, header, **limits)
    msg = str(e.value)
    assert e.value.status == status, msg
    assert "\n" not in msg and "Traceback" not in msg and " at 0x" not in msg
    return msg


def raw_json(doc) -> bytes:
    return json.dumps(doc).encode()


def answers(n, exit_stage=None):
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = rng.random(len(CLASSES)).astype(np.float32)
        p /= p.sum()
        out.append({"label": CLASSES[int(p.argmax())], "top_k": [], "probabilities": p, "exit_stage": exit_stage,
                    "compute": {"gflops": np.float32(1.5), "depth": i}, "method": "lora", "version": 2})
    return out


# ------------------------------------------------------------------------------ requests that parse
@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("channels", [1, 3])
def test_uint8_pixels_round_trip(binary, channels):
    x = np.random.default_rng(1).integers(0, 256, (2, 5, 4, channels), dtype=np.uint8)
    body, header = request([tensor("pixels", x, "UINT8", binary)], request_id="r-7")
    assert (header is not None) == binary
    call = parse(body, header)
    assert call.encoded is None and call.id == "r-7" and call.n == 2 and call.input_name == "pixels"
    assert call.pixels.dtype == np.uint8 and call.pixels.shape == x.shape
    np.testing.assert_array_equal(call.pixels, x)
    call.pixels[0, 0, 0, 0] = 7  # writable: the parser hands over its own copy


def test_uint8_nested_json_data():
    x = np.arange(2 * 2 * 3, dtype=np.uint8).reshape(1, 2, 2, 3)
    body = raw_json({"inputs": [{"name": "px", "shape": [1, 2, 2, 3], "datatype": "UINT8", "data": x.tolist()}]})
    np.testing.assert_array_equal(parse(body).pixels, x)


@pytest.mark.parametrize("shape", [(3,), (3, 1)])
def test_bytes_binary_round_trip(shape):
    files = [b"\x89PNG\r\n\x1a\n\x00\xff", b"", b"\xff\xd8\xff" * 50]
    x = np.array(files, dtype=np.object_).reshape(shape)
    body, header = request([tensor("image", x, "BYTES", True)])
    call = parse(body, header)
    assert call.pixels is None and call.encoded == files


@pytest.mark.parametrize("shape", [(2,), (2, 1)])
def test_bytes_json_is_base64(shape):
    files = [b"\x89PNG\r\n\x1a\n\x00\xff", b"\xff\xd8\xff\xe0"]
    x = np.array([base64.b64encode(f) for f in files], dtype=np.object_).reshape(shape)
    body, header = request([tensor("image", x, "BYTES", False)])
    assert header is None
    assert parse(body, header).encoded == files


def test_params_are_the_knobs_and_outputs_default_to_all():
    x = np.zeros((1, 2, 2, 3), np.uint8)
    knobs = {"budget": 0.5, "top_k": 4, "threshold": "0.8,0.9", "ratio": 0.7, "colour": "blue"}
    body, header = request([tensor("pixels", x, "UINT8", True)], parameters=knobs)
    call = parse(body, header)
    assert call.params == {"budget": 0.5, "top_k": 4, "threshold": "0.8,0.9", "ratio": 0.7}
    # tritonclient with no outputs named asks for every output in binary
    assert call.outputs == dict.fromkeys(["probabilities", "label", "exit_stage", "compute"], True)
    assert not call.explicit_outputs
    body = raw_json({"inputs": [{"name": "px", "shape": [1, 1, 1, 1], "datatype": "UINT8", "data": [3]}],
                     "parameters": {"priority": 1, "timeout": 5}})
    call = parse(body)
    assert call.params == {} and set(call.outputs.values()) == {False} and call.id is None


def test_requested_outputs_and_their_binary_flags():
    x = np.zeros((1, 2, 2, 3), np.uint8)
    outs = [th.InferRequestedOutput("label", binary_data=False), th.InferRequestedOutput("probabilities")]
    call = parse(*request([tensor("pixels", x, "UINT8", True)], outputs=outs))
    assert call.outputs == {"label": False, "probabilities": True} and call.explicit_outputs
    assert list(call.outputs) == ["label", "probabilities"]  # request order is response order


def test_gzip_and_deflate_bodies():
    x = np.zeros((1, 8, 8, 3), np.uint8)
    body, _ = request([tensor("pixels", x, "UINT8", True)])
    assert inflate(gzip.compress(body), "gzip", 10_000) == body
    assert inflate(zlib.compress(body), "deflate", 10_000) == body
    assert inflate(body, None, 10) == body
    for blob, coding, status in [(gzip.compress(body), "gzip", 413), (body, "br", 415),
                                 (b"not gzip", "gzip", 400), (gzip.compress(body)[:-12], "gzip", 400)]:
        with pytest.raises(ServeError) as e:
            inflate(blob, coding, len(body) - 1 if status == 413 else 10_000)
        assert e.value.status == status, str(e.value)


# ------------------------------------------------------------------------------ responses
def read(body, headers):
    return th.InferResult.from_response_body(body, verbose=False, header_length=headers.get(HEADER))


@pytest.mark.parametrize("binary", [True, False])
def test_response_read_by_tritonclient(binary):
    x = np.zeros((3, 2, 2, 3), np.uint8)
    outs = [th.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label", "compute")]
    call = parse(*request([tensor("pixels", x, "UINT8", True)], outputs=outs, request_id="abc"))
    got = answers(3)
    body, headers = infer_response("flowers", "2", got, CLASSES, call)
    assert headers["content-type"] == ("application/octet-stream" if binary else "application/json")
    assert (HEADER in headers) == binary
    r = read(body, headers)
    probs = r.as_numpy("probabilities")
    assert probs.dtype == np.float32 and probs.shape == (3, 3)
    np.testing.assert_array_equal(probs, np.stack([a["probabilities"] for a in got]))
    labels = [v.decode() if isinstance(v, bytes) else v for v in r.as_numpy("label")]
    assert labels == [a["label"] for a in got]
    compute = [json.loads(v) for v in r.as_numpy("compute")]
    assert compute == [{"gflops": 1.5, "depth": i} for i in range(3)]
    meta = r.get_response()
    assert meta["model_name"] == "flowers" and meta["model_version"] == "2" and meta["id"] == "abc"
    assert r.as_numpy("exit_stage") is None


def test_mixed_binary_and_json_outputs_and_exit_stage():
    x = np.zeros((2, 2, 2, 3), np.uint8)
    outs = [th.InferRequestedOutput("label", binary_data=False), th.InferRequestedOutput("exit_stage"),
            th.InferRequestedOutput("probabilities")]
    call = parse(*request([tensor("pixels", x, "UINT8", True)], outputs=outs))
    got = answers(2, exit_stage=3)
    got[1]["exit_stage"] = None
    body, headers = infer_response("t", None, got, CLASSES, call)
    r = read(body, headers)
    assert int(headers[HEADER]) < len(body)
    assert [o["name"] for o in r.get_response()["outputs"]] == ["label", "exit_stage", "probabilities"]
    assert "model_version" not in r.get_response() and "id" not in r.get_response()
    np.testing.assert_array_equal(r.as_numpy("exit_stage"), np.array([3, 0], np.int32))
    assert list(r.as_numpy("label")) == [a["label"] for a in got]
    assert r.as_numpy("probabilities").shape == (2, 3)


def test_default_outputs_after_a_tritonclient_request():
    call = parse(*request([tensor("pixels", np.zeros((1, 2, 2, 3), np.uint8), "UINT8", True)]))
    body, headers = infer_response("t", "1", answers(1), CLASSES, call)
    names = [o["name"] for o in read(body, headers).get_response()["outputs"]]
    assert names == ["probabilities", "label", "compute"]  # no exit stage: the task does not exit early


def test_error_body_is_what_tritonclient_reads():
    status, body, headers = error_response(ServeError(413, "too many"))
    assert status == 413 and json.loads(body) == {"error": "too many"}
    assert headers["content-type"] == "application/json"


# ------------------------------------------------------------------------------ metadata
def test_model_metadata():
    row = {"task": "flowers", "method": "lora", "version": 4, "runtime": "per_row_adapter"}
    m = model_metadata("flowers", row, (224, 224), classes=CLASSES)
    assert m["name"] == "flowers" and m["versions"] == ["4"] and m["platform"] == "petl_lora"
    assert [(t["name"], t["datatype"], t["shape"]) for t in m["inputs"]] == [
        ("image", "BYTES", [-1]), ("pixels", "UINT8", [-1, -1, -1, 3])]
    assert [(t["name"], t["datatype"], t["shape"]) for t in m["outputs"]] == [
        ("probabilities", "FP32", [-1, 3]), ("label", "BYTES", [-1]), ("compute", "BYTES", [-1])]
    assert m["parameters"]["image_size"] == [224, 224]
    m = model_metadata("e", {"method": "dyn_lora", "version": 1, "runtime": "early_exit"}, (32, 32))
    assert m["outputs"][0]["shape"] == [-1, -1] and "exit_stage" in [t["name"] for t in m["outputs"]]
    json.dumps(m)


# ------------------------------------------------------------------------------ refusals
def px(shape=(1, 2, 2, 3), **extra):
    n = int(np.prod(shape))
    return {"name": "pixels", "shape": list(shape), "datatype": "UINT8", "data": [1] * n, **extra}


def test_malformed_json_and_header_length():
    assert "malformed JSON" in refused(400, b'{"inputs": [')
    assert "malformed JSON" in refused(400, b"\xff\xfe")
    body, _ = request([tensor("pixels", np.zeros((1, 2, 2, 3), np.uint8), "UINT8", True)])
    assert "integer" in refused(400, body, "12abc")
    assert "integer" in refused(400, body, "1.5")
    assert "negative" in refused(400, body, "-4")
    assert "body has only" in refused(400, body, str(len(body) + 1))
    assert "malformed JSON" in refused(400, body, None)  # binary data with no header
    assert "request" in refused(400, b"[1, 2]")
    assert "inputs" in refused(400, b"{}")


def test_binary_sizes_that_lie():
    x = np.zeros((1, 2, 2, 3), np.uint8)
    body, header = request([tensor("pixels", x, "UINT8", True)])
    assert "add up" in refused(400, body + b"\x00", header)
    assert "add up" in refused(400, body[:-1], header)
    head = raw_json({"inputs": [px(parameters={"binary_data_size": 12}, data=None)]})
    assert "no Inference-Header-Content-Length" in refused(400, head + b"", None)
    head = raw_json({"inputs": [px(parameters={"binary_data_size": 12})]})
    assert "both" in refused(400, head + bytes(12), str(len(head)))
    def strings(size, tail):  # a BYTES input of 2 images with `tail` as its binary data
        head = raw_json({"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": size}}]})
        return head + tail, str(len(head))

    one = struct.pack("<I", 1) + b"a"
    assert "truncated" in refused(400, *strings(8, one + b"\x01\x00\x00"))
    assert "claims 9 bytes" in refused(400, *strings(11, one + struct.pack("<I", 9) + b"ab"))
    assert "holds more than 2" in refused(400, *strings(15, one * 3))
    assert "holds 1" in refused(400, *strings(5, one))


def test_input_count_datatype_and_names():
    assert "exactly one" in refused(400, raw_json({"inputs": []}))
    assert "exactly one" in refused(400, raw_json({"inputs": [px(), px()]}))
    msg = refused(400, raw_json({"inputs": [px(datatype="FP32")]}))
    assert "FP32" in msg and "BYTES" in msg and "UINT8" in msg
    assert "name" in refused(400, raw_json({"inputs": [{k: v for k, v in px().items() if k != "name"}]}))
    assert "neither data" in refused(400, raw_json({"inputs": [px(data=None)]}))
    assert "shape" in refused(400, raw_json({"inputs": [px(shape=(1, 2, -2, 3))]}))
    assert "shape" in refused(400, raw_json({"inputs": [{**px(), "shape": [1, 2.5, 2, 3]}]}))


def test_shapes_that_disagree_with_data():
    assert "needs 12 values" in refused(400, raw_json({"inputs": [{**px(), "data": [1] * 11}]}))
    assert "[N, H, W, C]" in refused(400, raw_json({"inputs": [px(shape=(2, 2, 3))]}))
    enc = base64.b64encode(b"x").decode()
    assert "says 3 images" in refused(400, raw_json(
        {"inputs": [{"name": "image", "shape": [3], "datatype": "BYTES", "data": [enc, enc]}]}))
    assert "[N] or [N, 1]" in refused(400, raw_json(
        {"inputs": [{"name": "image", "shape": [1, 2], "datatype": "BYTES", "data": [enc, enc]}]}))
    x = np.zeros((1, 2, 2, 3), np.uint8)
    t = tensor("pixels", x, "UINT8", True).set_shape([1, 2, 2, 1])  # 12 bytes for a 4-byte shape
    assert "needs 4 bytes" in refused(400, *request([t]))
    assert "not valid base64" in refused(400, raw_json(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["\u00e9t\u00e9 raw"]}]}))
    assert "base64 strings" in refused(400, raw_json(
        {"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [7]}]}))


def test_limits_are_413():
    msg = refused(413, raw_json({"inputs": [px(shape=(9, 1, 1, 3))]}))
    assert "limit of 8" in msg
    x = np.array([b"a"] * 9, dtype=np.object_)
    assert "limit of 8" in refused(413, *request([tensor("image", x, "BYTES", True)]))
    # N*H*W over max_pixels, refused from the shape before any data is read
    msg = refused(413, raw_json({"inputs": [{**px(shape=(2, 100, 51, 3)), "data": [0]}]}))
    assert "limit of 10000 pixels" in msg
    assert "no images" in refused(400, raw_json({"inputs": [px(shape=(0, 2, 2, 3))]}))


def test_pixel_values_and_channels():
    assert "0..255" in refused(400, raw_json({"inputs": [{**px(), "data": [256] + [0] * 11}]}))
    assert "0..255" in refused(400, raw_json({"inputs": [{**px(), "data": [-1] + [0] * 11}]}))
    assert "0..255" in refused(400, raw_json({"inputs": [{**px(), "data": [0.5] * 12}]}))
    assert "0..255" in refused(400, raw_json({"inputs": [{**px(), "data": ["1"] * 12}]}))
    assert "evenly nested" in refused(400, raw_json({"inputs": [{**px(), "data": [[1, 2], [3]]}]}))
    assert "C = 4" in refused(400, raw_json({"inputs": [px(shape=(1, 2, 2, 4))]}))
    assert "empty" in refused(400, raw_json({"inputs": [px(shape=(1, 0, 2, 3))]}))


def test_bad_outputs_and_parameters():
    x = np.zeros((1, 2, 2, 3), np.uint8)
    assert "unknown output 'logits'" in refused(400, *request([tensor("pixels", x, "UINT8", True)],
                                                              outputs=[th.InferRequestedOutput("logits")]))
    out = [th.InferRequestedOutput("label", class_count=3)]
    assert "classification" in refused(400, *request([tensor("pixels", x, "UINT8", True)], outputs=out))
    assert "twice" in refused(400, raw_json({"inputs": [px()], "outputs": [{"name": "label"}, {"name": "label"}]}))
    assert "binary_data_output" in refused(400, raw_json({"inputs": [px()], "parameters": {"binary_data_output": 1}}))
    assert "shared-memory" in refused(400, raw_json(
        {"inputs": [px(parameters={"shared_memory_region": "r"})]}))
