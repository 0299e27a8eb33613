"""The bad-input corpus, through real Ray Serve (one deployment: ``test_serving``'s ``served`` app,
max body 0.25 MB, keys ``test-key`` = every task and ``digits-only`` = digits-1k). Each case gets
its expected status (a 4xx, or a correct 200); none gets a 500; no body holds a traceback, a
Python object address or a server path; the server answers a normal request correctly afterwards.
The counts per status go to ``$PETL_CORPUS_OUT`` (default: the test's tmp dir) and stdout."""

import base64
import io
import json
import os
import re
import struct
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from test_serving import BROKEN, KEY, LIMITED, SERVED, _local, _png, served  # noqa: F401 - the one deployment

pytestmark = pytest.mark.slow

LEAKS = re.compile(r"Traceback|File \"| at 0x[0-9a-f]+|/tmp/|s3://")
DIGITS, LORA, DYN, DYT = "digits-1k", "dsprites_loc-1k", "norb_azimuth-1k", "clevr_count-1k"


def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _rgb(size=(32, 32), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size[::-1], 3), dtype=np.uint8))


def _png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG claiming ``width`` x ``height`` with almost no data: a bomb as the header shows it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def _gif_bomb() -> bytes:
    data = bytearray(_encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen
    i = data.index(0x2C, 13)  # image descriptor
    data[i + 5:i + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def _exif_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_rgb((40, 20)), "JPEG", exif=exif.tobytes())


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _json(image=None, tasks=(DIGITS,), **fields) -> dict:
    body = {"image": _b64(image if image is not None else _png()), **fields}
    if tasks is not None:
        body["tasks"] = list(tasks) if isinstance(tasks, tuple) else tasks
    return {"json": body}


def _multipart(image=None, tasks=DIGITS, **fields) -> dict:
    data = {**({"tasks": tasks} if tasks is not None else {}), **fields}
    return {"files": {"image": ("x", image if image is not None else _png(), "application/octet-stream")}, "data": data}


def _raw(content: bytes, ctype: str | None = "application/json") -> dict:
    return {"content": content, "headers": {"content-type": ctype} if ctype else {}}


def _with(req: dict, **headers) -> dict:
    return {**req, "headers": {**req.get("headers", {}), **headers}}


def _detail_lacks(*names):
    def check(r):
        assert not any(n in r.text for n in names), f"body names {names}: {r.text[:300]}"
    return check


def _results(*tasks, count=None):
    def check(r):
        got = r.json()["results"]
        assert set(got) == set(tasks) and all(got[t].get("label") is not None for t in tasks), r.text[:300]
        if count is not None:
            assert all(len(got[t]["top_k"]) == count for t in tasks), r.text[:300]
    return check


def _many(n, *tasks):
    def check(r):
        got = r.json()["results"]
        assert isinstance(got, list) and len(got) == n, r.text[:300]
        assert all(set(g) == set(tasks) and all(g[t].get("label") for t in tasks) for g in got), r.text[:300]
    return check


def _oip(n):
    def check(r):
        outs = {o["name"]: o for o in r.json()["outputs"]}
        assert outs["probabilities"]["shape"][0] == n and len(outs["label"]["data"]) == n, r.text[:300]
    return check


def _listed(*tasks):
    def check(r):
        assert sorted(t["task"] for t in r.json()["tasks"]) == sorted(tasks), r.text[:300]
    return check


def _chunks(total: int):
    for _ in range(total // 65536 + 1):
        yield b"a" * 65536


OTHER = [t for t in SERVED if t != DIGITS]
PREDICT = "/v1/predict"


def cases() -> list[tuple]:
    """``(name, method, path, request kwargs, auth, expected status, extra check)``; auth: the
    client's key (KEY), another key, or None for no Authorization header."""
    png = _png()
    c = []

    def add(name, req, status, auth=KEY, check=None, method="POST", path=PREDICT):
        c.append((name, method, path, req, auth, status, check))

    # --- auth
    add("auth: no header", _json(), 401, auth=None)
    add("auth: bearer without a key", _with(_json(), Authorization="Bearer"), 401, auth=None)
    add("auth: basic scheme", _with(_json(), Authorization=f"Basic {KEY}"), 401, auth=None)
    add("auth: wrong key", _json(), 401, auth="not-a-key")
    add("auth: 8 KB key", _json(), 401, auth="k" * 8000)
    add("auth: key prefix", _json(), 401, auth=KEY[:-1])
    add("auth: restricted key, other served task", _json(tasks=(LORA,)), 403, auth=LIMITED)
    add("auth: restricted key, unknown task", _json(tasks=("no-such-task",)), 403, auth=LIMITED,
        check=_detail_lacks(*OTHER))
    add("auth: restricted key, own + other", _json(tasks=(DIGITS, LORA)), 403, auth=LIMITED)
    add("auth: restricted key, own task", _json(), 200, auth=LIMITED, check=_results(DIGITS))
    add("auth: restricted key lists its tasks", {}, 200, auth=LIMITED, method="GET", path="/v1/tasks",
        check=_listed(DIGITS))
    add("auth: full key lists every task", {}, 200, method="GET", path="/v1/tasks", check=_listed(*SERVED, *BROKEN))
    add("auth: tasks without a key", {}, 401, auth=None, method="GET", path="/v1/tasks")
    # --- content types
    add("ctype: text/plain", _raw(b"hello", "text/plain"), 415)
    add("ctype: none", _raw(json.dumps(_json()["json"]).encode(), None), 415)
    add("ctype: xml", _raw(b"<a/>", "application/xml"), 415)
    add("ctype: form-urlencoded", {"data": {"tasks": DIGITS}}, 415)
    add("ctype: json with charset", _raw(json.dumps(_json()["json"]).encode(), "application/json; charset=utf-8"),
        200, check=_results(DIGITS))
    add("ctype: upper-case JSON", _raw(json.dumps(_json()["json"]).encode(), "APPLICATION/JSON"), 200)
    add("ctype: multipart, no boundary", _raw(b"--x\r\n\r\n", "multipart/form-data"), 400)
    add("ctype: multipart, garbage", _raw(b"\0garbage" * 20, "multipart/form-data; boundary=zzz"), 400)
    add("ctype: multipart, image as text field", {"data": {"image": "abc", "tasks": DIGITS},
                                                  "files": {"other": ("o", b"x")}}, 400)
    add("ctype: multipart ok", _multipart(), 200, check=_results(DIGITS))
    add("ctype: multipart, repeated tasks", _multipart(tasks=[DIGITS, LORA]), 200, check=_results(DIGITS, LORA))
    add("ctype: multipart, no tasks", _multipart(tasks=None), 400)
    add("ctype: JSON header, multipart body", _with(_multipart(), **{"content-type": "application/json"}), 400)
    # --- body sizes (limit 0.25 MB)
    add("size: JSON over the limit", _json(image=b"\0" * 300_000), 413)
    add("size: multipart over the limit", _multipart(image=b"\0" * 300_000), 413)
    add("size: chunked, no length, over the limit", {"content": _chunks(400_000),
                                                     "headers": {"content-type": "application/json"}}, 413)
    add("size: empty JSON body", _raw(b""), 400)
    add("size: empty multipart image", _multipart(image=b""), 400)
    # --- image formats and bombs
    for fmt, im in (("JPEG", _rgb()), ("WEBP", _rgb()), ("GIF", _rgb().convert("P")), ("BMP", _rgb()),
                    ("TIFF", _rgb()), ("PNG RGBA", _rgb().convert("RGBA")), ("PNG LA", _rgb().convert("LA")),
                    ("PNG 1-bit", _rgb().convert("1")), ("JPEG CMYK", _rgb().convert("CMYK")),
                    ("PNG 16-bit", Image.fromarray(np.arange(1024, dtype=np.uint16).reshape(32, 32) * 64)),
                    ("PNG 1x1", Image.new("RGB", (1, 1))), ("PNG 4000x1", Image.new("L", (4000, 1)))):
        add(f"image: {fmt}", _json(_encode(im, fmt.split()[0])), 200, check=_results(DIGITS))
    add("image: JPEG with EXIF rotation", _json(_exif_jpeg()), 200)
    add("image: data URL", {"json": {"image": f"data:image/png;base64,{_b64(png)}", "tasks": [DIGITS]}}, 200)
    add("image: 48 KB PNG of 20000x20000", _json(_encode(Image.new("1", (20000, 20000)))), 413)
    add("image: PNG header 6300x6300", _json(_png_header(6300, 6300)), 413)
    add("image: PNG header 100000x100000", _json(_png_header(100_000, 100_000)), 413)
    add("image: GIF header 65535x65535", _json(_gif_bomb()), 413)
    add("image: PNG header 0x0", _json(_png_header(0, 0)), 400)
    add("image: text bytes", _json(b"not an image at all"), 400, check=_detail_lacks("BytesIO"))
    add("image: truncated PNG", _json(png[: len(png) // 2]), 400)
    add("image: PNG signature only", _json(png[:8]), 400)
    add("image: EPS", _json(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n"), 400)
    add("image: SVG", _json(b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'), 400)
    add("image: float TIFF", _json(_encode(Image.new("F", (8, 8)), "TIFF")), 400)
    add("image: empty", _json(b""), 400)
    # --- JSON shapes and values
    add("json: array", _raw(b"[]"), 400)
    add("json: null", _raw(b"null"), 400)
    add("json: string", _raw(b'"x"'), 400)
    add("json: broken", _raw(b'{"image": '), 400)
    add("json: nested 100k deep", _raw(b"[" * 100_000 + b"]" * 100_000), 400)
    add("json: not UTF-8", _raw(b'{"image": "\xff\xfe", "tasks": ["digits-1k"]}'), 400)
    add("json: no image", {"json": {"tasks": [DIGITS]}}, 400)
    add("json: image is a number", {"json": {"image": 123, "tasks": [DIGITS]}}, 400)
    add("json: image is a list", {"json": {"image": [_b64(png)], "tasks": [DIGITS]}}, 400)
    add("json: image is an object", {"json": {"image": {"b64": _b64(png)}, "tasks": [DIGITS]}}, 400)
    add("json: image not base64", {"json": {"image": "!!not base64!!", "tasks": [DIGITS]}}, 400)
    add("json: image non-ASCII", {"json": {"image": "ü" * 8, "tasks": [DIGITS]}}, 400)
    add("json: unknown extra field", _json(colour="blue"), 200)
    # --- knobs
    for raw in ("1e400", "-1e400", "NaN", "Infinity", "true", "0", "-1", "2.5", "1" + "0" * 30, '"three"', "[3]"):
        body = json.dumps(_json()["json"])[:-1] + f', "top_k": {raw}}}'
        add(f"knob: top_k {raw[:12]}", _raw(body.encode()), 400)
    add("knob: top_k \"2\"", _json(top_k="2"), 200, check=_results(DIGITS, count=2))
    add("knob: top_k 1000", _json(top_k=1000), 200, check=_results(DIGITS, count=10))
    add("knob: top_k multipart", _multipart(top_k="1"), 200, check=_results(DIGITS, count=1))
    add("knob: budget 2", _json(tasks=(DYN,), budget=2), 400)
    add("knob: budget true", _json(tasks=(DYN,), budget=True), 400)
    add("knob: budget 1e400", _raw(json.dumps(_json(tasks=(DYN,))["json"])[:-1].encode() + b', "budget": 1e400}'), 400)
    add("knob: budget 0.5", _json(tasks=(DYN,), budget=0.5), 200, check=_results(DYN))
    add("knob: budget on a linear task", _json(budget=0.5), 400)
    add("knob: threshold and budget", _json(tasks=(DYN,), budget=0.5, threshold=0.5), 400)
    add("knob: threshold []", _json(tasks=(DYN,), threshold=[]), 400)
    add("knob: threshold 65 values", _json(tasks=(DYN,), threshold=[0.5] * 65), 400)
    add("knob: threshold wrong count", _json(tasks=(DYN,), threshold=[0.5, 0.5]), 400)
    add("knob: threshold x3", _json(tasks=(DYN,), threshold=[0.9, 0.8, 0.7]), 200, check=_results(DYN))
    add("knob: threshold string list", _multipart(tasks=DYN, threshold="0.9,0.8,0.7"), 200)
    add("knob: threshold nested", _json(tasks=(DYN,), threshold=[[0.5]]), 400)
    add("knob: ratio 0", _json(tasks=(DYT,), ratio=0), 400)
    add("knob: ratio \"abc\"", _json(tasks=(DYT,), ratio="abc"), 400)
    add("knob: ratio 1e308", _json(tasks=(DYT,), ratio=1e308), 400)
    add("knob: ratio 0.5", _json(tasks=(DYT,), ratio=0.5), 200, check=_results(DYT))
    add("knob: ratio on a linear task", _json(ratio=0.5), 400)
    # --- task lists
    add("tasks: missing", _json(tasks=None), 400)
    add("tasks: []", _json(tasks=[]), 400)
    add("tasks: \"\"", _json(tasks=""), 400)
    add("tasks: \",,\"", _json(tasks=",,"), 400)
    add("tasks: numbers", _json(tasks=[1, 2]), 400)
    add("tasks: [null]", _json(tasks=[None]), 400)
    add("tasks: object", _json(tasks={"digits-1k": True}), 400)
    add("tasks: nested list", _json(tasks=[[DIGITS]]), 400)
    add("tasks: 65 names", _json(tasks=[f"t{i}" for i in range(65)]), 400)
    add("tasks: 300-char name", _json(tasks=["x" * 300]), 400)
    add("tasks: unknown", _json(tasks=("no-such-task",)), 404, check=lambda r: DIGITS in r.json()["detail"])
    add("tasks: duplicates", _json(tasks=[DIGITS, DIGITS, DIGITS]), 200, check=_results(DIGITS))
    add("tasks: comma string", _json(tasks=f"{DIGITS}, {LORA}"), 200, check=_results(DIGITS, LORA))
    add("tasks: every served task", _json(tasks=tuple(SERVED)), 200, check=_results(*SERVED))
    add("tasks: NaN adapter", _json(tasks=("fashion_mnist-1k",)), 503)
    add("tasks: other-backbone adapter", _json(tasks=("letters-1k",)), 503)
    # --- many images per request (/v1)
    add("many: JSON images", {"json": {"images": [_b64(png)] * 3, "tasks": [DIGITS, LORA]}}, 200,
        check=_many(3, DIGITS, LORA))
    add("many: repeated multipart image", {"files": [("image", ("a", png)), ("image", ("b", png))],
                                           "data": {"tasks": DIGITS}}, 200, check=_many(2, DIGITS))
    add("many: images not a list", {"json": {"images": _b64(png), "tasks": [DIGITS]}}, 400)
    add("many: images empty", {"json": {"images": [], "tasks": [DIGITS]}}, 400)
    add("many: image and images", {"json": {"image": _b64(png), "images": [_b64(png)], "tasks": [DIGITS]}}, 400)
    add("many: 65 images", {"json": {"images": [_b64(_encode(Image.new("L", (1, 1))))] * 65, "tasks": [DIGITS]}},
        413, check=lambda r: "64" in r.json()["detail"])
    add("many: the second of 3 corrupt", {"json": {"images": [_b64(png), _b64(png[:30]), _b64(png)],
                                                   "tasks": [DIGITS]}}, 400,
        check=lambda r: "image 1" in r.json()["detail"])
    add("many: a number in the list", {"json": {"images": [_b64(png), 7], "tasks": [DIGITS]}}, 400)
    # --- Open Inference Protocol v2 (errors in OIP's {"error": ...} form)
    px = np.zeros((2, 32, 32, 3), dtype=np.uint8)

    def oip(inputs, **extra):
        return {"json": {"inputs": inputs, **extra}}

    def u8(shape=(2, 32, 32, 3), data=None, datatype="UINT8", name="pixels"):
        return {"name": name, "shape": list(shape), "datatype": datatype,
                "data": data if data is not None else np.zeros(shape, dtype=np.uint8).reshape(-1).tolist()}

    def binary(header: dict, blob: bytes, length: int | None = None) -> dict:
        head = json.dumps(header).encode()
        return _raw(head + blob, "application/octet-stream") | {
            "headers": {"content-type": "application/octet-stream",
                        "Inference-Header-Content-Length": str(len(head) if length is None else length)}}

    raw_in = {"name": "pixels", "shape": [2, 32, 32, 3], "datatype": "UINT8",
              "parameters": {"binary_data_size": px.nbytes}}
    infer = f"/v2/models/{DIGITS}/infer"

    def add2(name, req, status, path=infer, **kw):
        add(f"oip: {name}", req, status, path=path, **kw)

    add2("JSON UINT8 ok", oip([u8()]), 200, check=_oip(2))
    add2("binary UINT8 ok", binary({"inputs": [raw_in]}, px.tobytes()), 200, check=_oip(2))
    add2("BYTES base64 ok", oip([{"name": "image", "shape": [1], "datatype": "BYTES", "data": [_b64(png)]}]), 200,
         check=_oip(1))
    add2("BYTES budget on a Dyn task", oip([u8()], parameters={"budget": 0.5}), 200, path=f"/v2/models/{DYN}/infer")
    add2("metadata", {}, 200, method="GET", path=f"/v2/models/{DIGITS}")
    add2("model ready", {}, 200, method="GET", path=f"/v2/models/{DIGITS}/ready")
    add2("live without a key", {}, 200, auth=None, method="GET", path="/v2/health/live")
    add2("not JSON", _raw(b"{inputs"), 400)
    add2("JSON array", _raw(b"[]"), 400)
    add2("no inputs", oip([]), 400)
    add2("two image inputs", oip([u8(), u8(name="more")]), 400)
    add2("FP32 input", oip([u8(datatype="FP32")]), 400)
    add2("shape vs data", oip([u8(data=[0] * 10)]), 400)
    add2("pixel 300", oip([u8(shape=(1, 1, 1, 3), data=[0, 300, 0])]), 400)
    add2("negative shape", oip([u8(shape=(-1, 32, 32, 3), data=[])]), 400)
    add2("4 channels", oip([u8(shape=(1, 2, 2, 4))]), 400)
    add2("3-d UINT8", oip([u8(shape=(2, 32, 32))]), 400)
    add2("65 images", oip([u8(shape=(65, 1, 1, 3))]), 413)
    add2("too many pixels", oip([u8(shape=(8, 1024, 1024, 3), data=[])]), 413)  # the shape says it: data unread
    add2("BYTES not base64", oip([{"name": "image", "shape": [1], "datatype": "BYTES", "data": ["%%%"]}]), 400)
    add2("BYTES bomb", oip([{"name": "image", "shape": [1], "datatype": "BYTES",
                             "data": [_b64(_png_header(100_000, 100_000))]}]), 413)
    add2("header length not a number", binary({"inputs": [raw_in]}, px.tobytes(), length=None) | {
        "headers": {"Inference-Header-Content-Length": "ten", "content-type": "application/octet-stream"}}, 400)
    add2("header length past the body", binary({"inputs": [raw_in]}, px.tobytes(), length=10**6), 400)
    add2("header length negative", binary({"inputs": [raw_in]}, px.tobytes(), length=-5), 400)
    add2("binary size larger than sent", binary({"inputs": [raw_in]}, px.tobytes()[:100]), 400)
    add2("binary bytes left over", binary({"inputs": [raw_in]}, px.tobytes() + b"extra"), 400)
    add2("binary size without the header", _raw(json.dumps({"inputs": [raw_in]}).encode() + px.tobytes()), 400)
    add2("gzip bomb", {"content": zlib.compress(b"{" + b" " * 50_000_000 + b"}"),
                       "headers": {"content-type": "application/json", "content-encoding": "deflate"}}, 413)
    add2("unknown content encoding", _with(_raw(b"{}"), **{"content-encoding": "br"}), 415)
    add2("unknown model", oip([u8()]), 404, path="/v2/models/no-such-task/infer")
    add2("no key", oip([u8()]), 401, auth=None)
    add2("restricted key, other model", oip([u8()]), 403, auth=LIMITED, path=f"/v2/models/{LORA}/infer")
    add2("budget on a linear task", oip([u8()], parameters={"budget": 0.5}), 400)
    add2("budget 2", oip([u8()], parameters={"budget": 2}), 400, path=f"/v2/models/{DYN}/infer")
    add2("NaN adapter", oip([u8()]), 503, path="/v2/models/fashion_mnist-1k/infer")
    add2("version not served", oip([u8()]), 404, path=f"/v2/models/{DIGITS}/versions/9/infer")
    add2("GET infer", {}, 405, method="GET")
    add2("over the body limit", _raw(b"{" + b" " * 300_000 + b"}"), 413)
    # --- other routes
    add("route: GET predict", {}, 405, method="GET")
    add("route: PUT predict", _json(), 405, method="PUT")
    add("route: unknown path", {}, 404, method="GET", path="/v1/nothing")
    add("route: readyz without names", {}, 200, auth=None, method="GET", path="/readyz",
        check=_detail_lacks(DIGITS, *BROKEN))
    return c


def test_bad_input_corpus(served, tmp_path, capsys):
    import httpx

    base = str(served["client"].base_url)
    counts, wrong = Counter(), []
    all_cases = cases()
    assert len(all_cases) >= 60
    with httpx.Client(base_url=base, timeout=60) as bare:
        for name, method, path, req, auth, want, check in all_cases:
            headers = {**({"Authorization": f"Bearer {auth}"} if auth else {}), **req.get("headers", {})}
            r = bare.request(method, path, **{k: v for k, v in req.items() if k != "headers"}, headers=headers)
            counts[r.status_code] += 1
            problems = []
            if r.status_code != want:
                problems.append(f"status {r.status_code}, expected {want}")
            if LEAKS.search(r.text):
                problems.append(f"leak {LEAKS.search(r.text).group(0)!r}")
            try:
                # OIP's own errors are {"error": ...}; the framework's (405) {"detail": ...}
                fields = ("error", "detail") if path.startswith("/v2/") else ("detail",)
                if r.status_code >= 400 and not any(isinstance(r.json().get(f), str) for f in fields):
                    problems.append(f"error without {' or '.join(fields)}")
            except ValueError:
                problems.append("error body is not JSON")
            if not problems and check is not None:
                try:
                    check(r)
                except AssertionError as e:
                    problems.append(str(e))
            if problems:
                wrong.append(f"{name}: {'; '.join(problems)}: {r.text[:200]}")
    # the server still answers normally, and correctly
    image = _png(3)
    r = served["client"].post(PREDICT, json={"image": _b64(image), "tasks": [DIGITS]})
    assert r.status_code == 200, r.text
    logits, _ = _local(served, DIGITS, image)
    assert r.json()["results"][DIGITS]["label"] == str(int(logits.argmax()))

    summary = {"cases": len(all_cases), "by_status": {str(k): v for k, v in sorted(counts.items())},
               "mismatches": len(wrong)}
    out = os.environ.get("PETL_CORPUS_OUT") or str(tmp_path / "corpus_counts.json")
    with open(out, "w") as f:
        json.dump(summary, f, indent=2)
    with capsys.disabled():
        print(f"\nbad-input corpus: {json.dumps(summary)} -> {out}")
    assert counts[500] == 0 and not wrong, "\n".join(wrong)
