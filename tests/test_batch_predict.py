"""Integration: `petl predict` (``inference/batch.py``) on a local Ray cluster, adapters of four
runtimes from a real MLflow registry over a real S3-compatible server (moto on 127.0.0.1). Every
row equals the in-process engine's answer; a corrupt file gets an error and never stops the run;
bad arguments fail in one line before Ray starts."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from platform_stack import BUCKET, platform_stack

pytestmark = pytest.mark.slow

TASKS = {"t-linear": "linear", "t-lora": "lora", "t-dyn": "dyn_lora", "t-dyt": "dyt"}
CLASSES = ["a", "b", "c"]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from petl_platform import build_model, create_backbone
    from petl_platform.tracking.runs import log_and_register

    root = tmp_path_factory.mktemp("predict")
    with platform_stack(root) as st:
        bb = create_backbone(st["backbone"])
        models = {}
        for i, (task, method) in enumerate(TASKS.items()):
            torch.manual_seed(i)
            models[task] = build_model(method, bb, len(CLASSES))
            log_and_register(st["settings"], models[task], task, CLASSES)
        yield {**st, "bb": bb, "models": models, "root": root}


@pytest.fixture(scope="module")
def cluster(stack):
    import ray

    from petl_platform.cluster.connect import ensure_ray

    ensure_ray(num_cpus=2)
    try:
        yield stack
    finally:
        ray.shutdown()


def _expected(stack, blobs: dict[str, bytes]) -> dict:
    """``{name: {column: value}}`` from the in-process engine, one call for every image x task."""
    from petl_platform.data import make_transform
    from petl_platform.inference import Engine, Row

    names = list(blobs)
    tf = make_transform(stack["bb"])
    x = torch.stack([tf(Image.open(io.BytesIO(blobs[n])).convert("RGB")) for n in names])
    rows = [Row(i, t) for i in range(len(names)) for t in TASKS]
    out = {n: {} for n in names}
    for row, r in zip(rows, Engine(stack["bb"]).run(x, rows, stack["models"])):
        p, k = r.logits.softmax(-1).max(-1)
        out[names[row.image]].update({f"{row.task}.label": CLASSES[int(k)], f"{row.task}.probability": float(p),
                                      f"{row.task}.exit_stage": r.exit_stage, f"{row.task}.gflops": r.compute["gflops"]})
    return out


def _check(table: dict, expected: dict, bad: set[str]) -> None:
    got = {name: i for i, name in enumerate(table["path"])}
    assert set(got) == set(expected) | bad
    for name in bad:
        i = got[name]
        assert table["error"][i] and "not a readable image" in table["error"][i]
        assert all(table[f"{t}.label"][i] is None and table[f"{t}.probability"][i] is None for t in TASKS)
    for name, want in expected.items():
        i = got[name]
        assert table["error"][i] is None
        for t in TASKS:
            assert table[f"{t}.label"][i] == want[f"{t}.label"], (name, t)
            assert table[f"{t}.probability"][i] == pytest.approx(want[f"{t}.probability"], abs=1e-5)
            if TASKS[t] == "dyt":  # DyT reports its batch's mean compute: depends on the batch's other images
                assert 0 < table[f"{t}.gflops"][i] <= want["t-lora.gflops"]
            else:
                assert table[f"{t}.gflops"][i] == pytest.approx(want[f"{t}.gflops"], rel=1e-3)
    assert table["t-dyn.exit_stage"] == [None if n in bad else expected[n]["t-dyn.exit_stage"] for n in table["path"]]
    assert "t-lora.exit_stage" not in table  # only early-exit tasks have one


# ----------------------------------------------------------------------------- before Ray
def test_bad_arguments_fail_in_one_line_before_ray_starts(stack, tmp_path, capsys):
    import ray

    from petl_platform.cli import main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.png").write_bytes(_png(0))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    out = str(tmp_path / "out.parquet")
    cases = [(["--tasks", "t-lora,nope", "--input", str(tmp_path / "in")], "'nope'"),
             (["--tasks", "t-lora", "--input", str(tmp_path / "missing")], "no such file or folder"),
             (["--tasks", "t-lora", "--input", str(tmp_path / "empty")], "no images in it"),
             (["--tasks", "t-lora", "--input", f"s3://{BUCKET}/nothing-here/"], "no images under this prefix"),
             (["--tasks", "t-lora", "--input", str(tmp_path / "in"), "--alias", "nosuch"], "'nosuch'")]
    for argv, reason in cases:
        assert main(["predict", *argv, "--output", out, "--backbone", stack["backbone"]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("petl: error:") and "\n" not in err and reason in err, err
    assert main(["predict", "--tasks", "t-lora", "--input", str(tmp_path / "in"), "--output", str(tmp_path),
                 "--backbone", stack["backbone"]]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert ray.is_initialized() is False
    assert not (tmp_path / "out.parquet").exists()


# ----------------------------------------------------------------------------- on Ray
def test_local_folder_rows_equal_the_in_process_engine(cluster, tmp_path, capsys):
    import pyarrow.parquet as pq

    from petl_platform.cli import main

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    blobs = {}
    for i in range(7):
        path = folder / ("sub" if i % 2 else "") / f"img{i}.png"
        path.write_bytes(_png(i))
        blobs[str(path.resolve())] = _png(i)
    corrupt = folder / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "README.txt").write_text("not an image: skipped")
    out = tmp_path / "preds.parquet"
    rc = main(["predict", "--tasks", ",".join(TASKS), "--input", str(folder), "--output", str(out),
               "--backbone", cluster["backbone"], "--batch-size", "3", "--no-progress", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["images"] == 8 and summary["errors"] == 1
    table = pq.read_table(out)
    assert table.column_names[0] == "path" and table.column_names[-1] == "error"
    _check(table.to_pydict(), _expected(cluster, blobs), {str(corrupt.resolve())})
    assert not out.with_name(out.name + ".tmp").exists()


def test_s3_prefix_rows_equal_the_in_process_engine(cluster, tmp_path):
    import pyarrow.parquet as pq

    from petl_platform.cluster.batch import predict_dataset

    s3, blobs = cluster["s3"], {}
    for i in range(10, 15):
        key = f"batch/images/{i}.png"
        s3.put_object(Bucket=BUCKET, Key=key, Body=_png(i))
        blobs[f"s3://{BUCKET}/{key}"] = _png(i)
    s3.put_object(Bucket=BUCKET, Key="batch/images/bad.jpg", Body=b"\xff\xd8\xff truncated")
    s3.put_object(Bucket=BUCKET, Key="batch/images/manifest.json", Body=b"{}")
    out = tmp_path / "s3.parquet"
    summary = predict_dataset(list(TASKS), f"s3://{BUCKET}/batch/images/", str(out), cluster["settings"],
                              backbone=cluster["backbone"], batch_size=4, progress=False)
    assert summary["images"] == 6 and summary["errors"] == 1 and summary["img_per_s"] > 0
    _check(pq.read_table(out).to_pydict(), _expected(cluster, blobs), {f"s3://{BUCKET}/batch/images/bad.jpg"})
