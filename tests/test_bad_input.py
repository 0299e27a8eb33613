"""Serving input hardening without Ray: image decoding (bombs, 16-bit, EXIF, alpha, object addresses),
knob and task-list validation, per-key task visibility, registry errors classified by type, and
adapter temp directories removed once loaded."""

import io
import json
import re
import struct
import sys
import tempfile
import types
import zlib

import numpy as np
import pytest
from PIL import Image

from petl_platform.errors import NotFoundError, PetlError
from petl_platform.serving import ApiKeys, ServeError, decode_image, parse_knobs
from petl_platform.serving.request import MAX_PIXELS, MAX_TASKS, parse_tasks, safe_text

ADDRESS = re.compile(r" at 0x[0-9a-f]+")


def as_pil(im):  # a "transform" that hands back the decoded RGB image
    return im


def png_header_only(width: int, height: int, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A PNG that claims ``width`` x ``height`` with a tiny IDAT: what a decompression bomb looks
    like to ``Image.open`` (which reads only the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def status_of(fn, *args) -> tuple[int, str]:
    with pytest.raises(ServeError) as e:
        fn(*args)
    return e.value.status, str(e.value)


# ----------------------------------------------------------------------------------------- images
@pytest.mark.parametrize("w,h", [(20000, 20000), (6300, 6300), (MAX_PIXELS + 1, 1), (10000, 9000)])
def test_pixel_bombs_are_413_from_the_header(w, h):
    """20000x20000 was Pillow's uncaught DecompressionBombError (a 500); 6300x6300 passed the old
    40 MP guard and took a replica for 1.6 s; 10000x9000 (90 MP) is in Pillow's warning band."""
    status, msg = status_of(decode_image, png_header_only(w, h), as_pil)
    assert status == 413 and "pixels" in msg and "resize" in msg


def test_a_real_48kb_bomb_is_413():
    data = encode(Image.new("1", (20000, 20000)))
    assert len(data) < 100_000
    assert status_of(decode_image, data, as_pil)[0] == 413


def test_max_pixels_is_configurable_and_checked_before_decoding():
    data = encode(Image.new("RGB", (64, 64)))
    assert decode_image(data, as_pil, max_pixels=64 * 64).size == (64, 64)
    assert status_of(decode_image, data, as_pil, 64 * 64 - 1)[0] == 413


def test_16bit_grayscale_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    data = encode(Image.fromarray(ramp))
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    got = np.asarray(decode_image(data, as_pil))
    assert got.shape == (64, 64, 3)
    assert (got == 255).mean() < 0.01  # the old code clipped 99.8 % to white
    np.testing.assert_allclose(got[..., 0].astype(float), ramp / 257, atol=1)


def test_exif_orientation_is_applied():
    im = Image.new("RGB", (40, 20), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    got = decode_image(encode(im, "JPEG", exif=exif.tobytes(), quality=95), as_pil)
    assert got.size == (20, 40)
    r, g, b = got.getpixel((10, 5))  # the blue half is on top once rotated
    assert b > 200 and r < 60


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_composited_onto_white(mode):
    im = Image.new(mode, (8, 8))  # all zeros: black and fully transparent
    if mode == "P":
        im.info["transparency"] = 0
    data = encode(im, "PNG", **({"transparency": 0} if mode == "P" else {}))
    got = decode_image(data, as_pil)
    assert got.mode == "RGB" and got.getpixel((3, 3)) == (255, 255, 255)


@pytest.mark.parametrize("mode,fmt", [("CMYK", "JPEG"), ("1", "PNG"), ("L", "PNG"), ("P", "GIF"), ("RGB", "WEBP"),
                                      ("RGB", "BMP"), ("I;16", "TIFF")])
def test_other_modes_and_formats_become_rgb(mode, fmt):
    got = decode_image(encode(Image.new(mode, (9, 7)), fmt), as_pil)
    assert got.mode == "RGB" and got.size == (9, 7)


@pytest.mark.parametrize("data,why", [
    (b"hello", "not a readable image"),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "not a readable image"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a readable image"),  # EPS: not opened
    (None, "truncated or corrupt"),
])
def test_decode_errors_are_400_without_object_addresses(data, why):
    if data is None:
        full = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
        data = full[: len(full) // 2]
    status, msg = status_of(decode_image, data, as_pil)
    assert status == 400 and why in msg
    assert not ADDRESS.search(msg) and "BytesIO" not in msg


def test_float_images_are_refused_with_a_reason():
    status, msg = status_of(decode_image, encode(Image.new("F", (4, 4)), "TIFF"), as_pil)
    assert status == 400 and "float" in msg


def test_safe_text_strips_addresses_and_newlines():
    text = "cannot identify image file <_io.BytesIO object at 0x7f3a2c1b9d50>\nmore"
    assert safe_text(text) == "cannot identify image file <data> more"
    assert len(safe_text("x" * 500, 100)) == 100


# ------------------------------------------------------------------------------------------ knobs
BAD_TOP_K = ["1e400", "-1e400", "NaN", "Infinity", "true", "false", "0", "-3", "1001", "3.5", '"three"', '""', "[3]",
             "{}", "1" + "0" * 400, '"' + "9" * 5000 + '"']


@pytest.mark.parametrize("raw", BAD_TOP_K, ids=lambda raw: raw[:12])
def test_bad_top_k_is_400(raw):
    body = json.loads(f'{{"top_k": {raw}}}')  # as the ingress parses it: 1e400 is inf, NaN is nan
    status, msg = status_of(parse_knobs, body)
    assert status == 400 and "top_k" in msg and len(msg) < 200


@pytest.mark.parametrize("value,want", [(1, 1), (3.0, 3), ("7", 7), (" 5 ", 5), (1000, 1000), (None, 3)])
def test_good_top_k(value, want):
    assert parse_knobs({"top_k": value})["top_k"] == want


@pytest.mark.parametrize("name", ["budget", "threshold", "ratio"])
@pytest.mark.parametrize("value", [True, 10**400, float("inf"), float("nan"), 0, -0.5, 1.5, "abc", {}, [[0.5]]],
                         ids=["bool", "huge", "inf", "nan", "zero", "negative", "over_one", "text", "dict", "nested"])
def test_bad_fractions_are_400(name, value):
    status, msg = status_of(parse_knobs, {name: value})
    assert status == 400 and name in msg


def test_threshold_lists():
    assert parse_knobs({"threshold": "0.5,0.7"})["threshold"] == [0.5, 0.7]  # multipart form value
    assert parse_knobs({"threshold": [0.9, 0.8, 0.7]})["threshold"] == [0.9, 0.8, 0.7]
    assert status_of(parse_knobs, {"threshold": []})[0] == 400
    assert status_of(parse_knobs, {"threshold": [0.5] * 65})[0] == 400
    assert status_of(parse_knobs, {"threshold": 0.5, "budget": 0.5})[0] == 400


@pytest.mark.parametrize("value", [None, "", ",,", [], [""], ["  "], [1], [None], {"a": 1}, 5,
                                   [f"t{i}" for i in range(MAX_TASKS + 1)], ["x" * 201]])
def test_bad_task_lists_are_400(value):
    assert status_of(parse_tasks, value)[0] == 400


def test_task_lists_drop_duplicates_in_order():
    assert parse_tasks(["b", "a", "b"]) == ["b", "a"]
    assert parse_tasks("a, b ,a") == ["a", "b"]


# ------------------------------------------------------------------------------------------- keys
def test_a_restricted_key_sees_only_its_tasks():
    keys = ApiKeys.parse("all=*;one=digits-1k,missing-task")
    served = ["digits-1k", "shapes-1k", "letters-1k"]
    assert keys.visible(keys.check("Bearer all"), served) == served
    assert keys.visible(keys.check("Bearer one"), served) == ["digits-1k"]
    # every task outside the key's list is 403, served or not: no existence oracle
    assert status_of(keys.check, "Bearer one", ["shapes-1k"])[0] == 403
    assert status_of(keys.check, "Bearer one", ["no-such-task"])[0] == 403
    assert status_of(keys.check, "Bearer nope")[0] == 401
    assert status_of(keys.check, "Basic all")[0] == 401


@pytest.mark.parametrize("text, problem", [
    ("a=*,b=digits-1k", "'KEY=' inside a task list"),        # ',' where ';' separates keys
    ("a=*,digits-1k", "'*' beside task names"),
    ("a=digits-1k,*", "'*' beside task names"),
    ("a=digits-1k,b=shapes-1k;c=*", "'KEY=' inside a task list"),
    ("a=", "empty task list"),
    ("a=*;b= , ", "empty task list"),
    ("a", "no '=' after the key"),
    ("=*", "empty key"),
    ("a=*;a=digits-1k", "listed twice"),
])
def test_a_malformed_key_list_is_one_clear_error(text, problem):
    with pytest.raises(PetlError) as e:
        ApiKeys.parse(text)
    msg = str(e.value)
    assert problem in msg and "key1=*;key2=task1,task2" in msg and "\n" not in msg
    assert "b=digits-1k" not in msg and "b=shapes-1k" not in msg  # never echoes a key


def test_well_formed_key_lists_parse():
    assert ApiKeys.parse("a=*; b = digits-1k , shapes-1k ;").keys == {"a": None, "b": {"digits-1k", "shapes-1k"}}
    assert ApiKeys.parse("a=digits-1k,").keys == {"a": {"digits-1k"}}  # a stray ',' is harmless
    assert ApiKeys.parse("").keys == {}


@pytest.mark.parametrize("raw, problem", [
    ({"a": "*,digits-1k"}, 'tasks must be "*" or a list'),
    ({"a": "digits-1k"}, 'tasks must be "*" or a list'),   # once a set of characters
    ({"a": []}, "empty task list"),
    ({"a": ["*", "digits-1k"]}, "'*' beside task names"),
    ({"a": ["b=digits-1k"]}, "'KEY=' inside a task list"),
    (["a"], "not a JSON object"),
])
def test_a_malformed_key_file_is_one_clear_error(tmp_path, monkeypatch, raw, problem):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(raw))
    monkeypatch.setenv("PETL_API_KEYS_FILE", str(path))
    with pytest.raises(PetlError, match=re.escape(problem)):
        ApiKeys.from_env()
    path.write_text(json.dumps({"a": "*", "b": ["digits-1k"]}))
    assert ApiKeys.from_env().keys == {"a": None, "b": {"digits-1k"}}


def test_petl_serve_refuses_malformed_keys_before_any_cluster_starts(monkeypatch, capsys):
    from petl_platform.cli import main

    def no_cluster(*a, **kw):
        raise AssertionError("a cluster would start")

    monkeypatch.setitem(sys.modules, "serve_apps.petl_app", types.SimpleNamespace(run_local=no_cluster))
    monkeypatch.delenv("PETL_API_KEYS_FILE", raising=False)
    monkeypatch.setenv("PETL_API_KEYS", "a=*,b=digits-1k")
    assert main(["serve", "--no-check", "--duration", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("petl: error: PETL_API_KEYS entry 1: 'KEY=' inside a task list") and "\n" not in err


# -------------------------------------------------------------------------------------- registry
@pytest.fixture(scope="module")
def registry(tmp_path_factory, tiny_backbone):
    from petl_platform.methods import build_model
    from petl_platform.tracking.runs import log_and_register
    from petl_platform.tracking.settings import TrackingSettings

    from platform_stack import sqlite_store  # a migrated template's copy: no 5-15 s of migrations

    root = tmp_path_factory.mktemp("registry")
    settings = TrackingSettings(sqlite_store(root / "m.db", str(root / "art")), str(root / "art"),
                                str(root / "ray")).prepare()
    for task in ("t1", "t2"):
        log_and_register(settings, build_model("linear", tiny_backbone, 3), task, ["a", "b", "c"])
    return settings


def petl_temp_dirs(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("petl-"))


def test_adapter_temp_dirs_are_removed_after_loads_evictions_and_refreshes(registry, tiny_backbone, tmp_path,
                                                                           monkeypatch):
    from petl_platform.methods import build_model
    from petl_platform.serving.models import TaskModelCache, describe
    from petl_platform.tracking.runs import log_and_register

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # this test's own temp dir, counted
    cache = TaskModelCache(tiny_backbone, registry, capacity=1, refresh_s=0.0)
    for task in ("t1", "t2", "t1", "t2"):  # every get after the first evicts the other task
        assert cache.get(task).task == task
    assert cache.stats["loads"] == 4 and cache.stats["evictions"] == 3
    log_and_register(registry, build_model("linear", tiny_backbone, 3), "t2", ["a", "b", "c"])
    cache.refresh_once()  # the background alias check, run here once
    assert cache.get("t2").version == 2 and cache.stats["refreshes"] == 1  # replaced by the moved alias
    assert describe(registry, "t1")["method"] == "linear"
    assert petl_temp_dirs(tmp_path) == []  # the old code left one petl-* directory per load


def test_registry_errors_are_classified_by_type(registry, tiny_backbone, monkeypatch):
    import petl_platform.serving.models as models
    from petl_platform.tracking.runs import show_model

    with pytest.raises(NotFoundError):
        show_model(registry, "no-such-task@champion")
    cache = models.TaskModelCache(tiny_backbone, registry)
    assert status_of(cache.get, "no-such-task")[0] == 404
    assert status_of(models.TaskModelCache(tiny_backbone, registry, alias="staging").get, "t1")[0] == 404  # no alias

    def store_down(*args, **kwargs):  # a store fault whose text happens to read like "not found"
        raise PetlError("registered model 't1' has no version or alias 'champion' (TEMPORARILY_UNAVAILABLE)")

    monkeypatch.setattr(models, "fetch_adapter", store_down)
    status, msg = status_of(models.TaskModelCache(tiny_backbone, registry).get, "t1")
    assert status == 503 and "retry" in msg and "TEMPORARILY" not in msg  # the store's text stays in the log


def test_a_refused_adapter_names_no_server_path(registry, tiny_backbone, tiny_backbone8, tmp_path, monkeypatch):
    from petl_platform.methods import build_model
    from petl_platform.serving.models import TaskModelCache
    from petl_platform.tracking.runs import log_and_register

    log_and_register(registry, build_model("linear", tiny_backbone8, 3), "other-backbone", ["a", "b", "c"])
    monkeypatch.setattr(tiny_backbone, "petl_name", "/srv/private/weights/vit.safetensors")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    status, msg = status_of(TaskModelCache(tiny_backbone, registry).get, "other-backbone")
    assert status == 503 and "fingerprint" in msg and "'vit.safetensors'" in msg
    assert "/srv" not in msg and str(tmp_path) not in msg and "other-backbone@champion" in msg
