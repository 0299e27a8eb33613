"""`petl predict`'s two stages without Ray: the decode stage (``decode_batch``, Ray Data tasks)
gives the same pixels as the HTTP path, and the scoring stage (``score_pixels``, the actors) on
those uint8 pixels equals the engine on the training transform's float input; a file that does
not decode keeps its error and nulls, and the others still answer."""

import io

import numpy as np
import pytest
import torch
from PIL import Image


def _png(seed: int, size=(40, 28)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def setup(tiny_backbone8):
    from petl_platform import build_model
    from petl_platform.data import Pixels, make_transform

    bb = tiny_backbone8
    models = {}
    for i, method in enumerate(["linear", "lora", "dyn_lora", "dyt"]):
        torch.manual_seed(i)
        models[f"t-{method}"] = build_model(method, bb, 3).eval()
    return bb, models, make_transform(bb), Pixels(make_transform(bb), tuple(bb.patch_embed.img_size))


@pytest.mark.parametrize("light", [True, False], ids=["imaging.Geometry", "data.Pixels"])
def test_decode_batch_pixels_and_errors(setup, light):
    from petl_platform.cluster.decode import decode_batch

    bb, _, tf, pixels = setup
    geometry = pixels.light if light else pixels  # the light path, and the fallback for other transforms
    assert geometry is not None
    blobs = [_png(0), b"not an image", _png(1, (32, 32)), b""]
    got = decode_batch({"path": np.array(["a", "b", "c", "d"], dtype=object), "bytes": blobs}, geometry)
    assert got["pixels"].dtype == np.uint8 and got["pixels"].shape == (4, 3, 32, 32)
    assert list(got["path"]) == ["a", "b", "c", "d"]
    assert got["error"][0] is None and got["error"][2] is None
    assert "not a readable image" in got["error"][1] and "empty image" in got["error"][3]
    assert not got["pixels"][1].any() and not got["pixels"][3].any()
    for i, blob in ((0, blobs[0]), (2, blobs[2])):  # normalized, exactly the training transform
        want = tf(Image.open(io.BytesIO(blob)).convert("RGB"))
        assert torch.equal(pixels.normalize(torch.from_numpy(got["pixels"][i])[None])[0], want)


def test_score_pixels_equals_engine_on_float_input(setup):
    import pyarrow as pa

    from petl_platform.cluster.batch import output_schema, score_pixels
    from petl_platform.cluster.decode import decode_batch
    from petl_platform.inference import Engine, Row

    bb, models, tf, pixels = setup
    engine = Engine(bb)
    classes = ["x", "y", "z"]
    entries = {t: type("E", (), {"model": m, "classes": classes})() for t, m in models.items()}
    schema = output_schema(list(models), {t: engine.info(t, m).runtime for t, m in models.items()})
    blobs = [_png(i) for i in range(5)]
    blobs.insert(2, b"\x89PNG broken")
    paths = [f"p{i}" for i in range(len(blobs))]
    got = decode_batch({"path": paths, "bytes": blobs}, pixels.light)
    table = score_pixels(engine, entries, schema, paths, torch.from_numpy(got["pixels"]), list(got["error"]))
    assert isinstance(table, pa.Table) and table.schema == schema
    cols = table.to_pydict()
    good = [i for i in range(len(blobs)) if i != 2]
    x = torch.stack([tf(Image.open(io.BytesIO(blobs[i])).convert("RGB")) for i in good])
    rows = [Row(j, t) for j in range(len(good)) for t in models]
    for row, r in zip(rows, Engine(bb).run(x, rows, models)):
        i = good[row.image]
        p, k = r.logits.softmax(-1).max(-1)
        assert cols[f"{row.task}.label"][i] == classes[int(k)]
        assert cols[f"{row.task}.probability"][i] == pytest.approx(float(p), abs=1e-5)
    assert cols["error"][2] and all(cols[f"{t}.label"][2] is None for t in models)
    assert all(cols["error"][i] is None for i in good)
    assert cols["t-dyn_lora.exit_stage"][2] is None and all(cols["t-dyn_lora.exit_stage"][i] is not None for i in good)


def test_actor_sizing_uses_every_core(monkeypatch):
    """``_actors`` on CPU clusters: the actors' threads cover the cluster's CPUs, their CPU
    reservations leave room for decode tasks, and one actor never asks more than a node has."""
    import ray

    from petl_platform.cluster import batch

    def cluster(cpus, nodes, gpus=0):
        monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": float(cpus), **({"GPU": gpus} if gpus else {})})
        monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True, "Resources": {"CPU": cpus / nodes}}] * nodes)

    cluster(2, 1)
    r = batch._actors(None)
    assert r["concurrency"] == 1 and r["threads"] == 2 and r["num_gpus"] == 0
    assert r["num_cpus"] + batch.DECODE_CPUS <= 2
    r = batch._actors(2)
    assert r["concurrency"] == 2 and r["threads"] == 1 and 2 * r["num_cpus"] + batch.DECODE_CPUS <= 2
    cluster(16, 2)
    r = batch._actors(None)
    assert r["concurrency"] == 4 and r["threads"] == 4 and r["num_cpus"] <= 8 - batch.DECODE_CPUS
    assert 4 * r["num_cpus"] + 2 * batch.DECODE_CPUS <= 16
    cluster(8, 1, gpus=2)
    assert batch._actors(None) == {"concurrency": 2, "num_gpus": 1, "num_cpus": 1, "threads": 0}
