"""Offline scoring (``petl predict``): a folder or an ``s3://`` prefix of images through Ray Data,
every image answered for every task, one parquet file out.

- **Checked before Ray starts** (one ``PetlError`` line each): the tasks resolve under the alias
  and load on the backbone (the same store a Serve replica uses, ``serving/models.py``), the input
  holds at least one image, the output's folder is writable.
- **Streamed:** ``read_binary_files`` -> ``map_batches`` with a callable class. Each actor holds
  the frozen backbone once, every task's adapter from the MLflow registry, and the mixed-task
  engine (``inference/engine.py``): one engine call per batch answers every image for every task.
  GPU actors (``num_gpus=1``) when the cluster has GPUs, CPU actors otherwise. The driver writes
  the result batches to one parquet file as they arrive (``<output>.tmp`` renamed at the end, so a
  failed run never leaves half a file behind).
- **A bad image never stops the run:** each row is decoded on its own with the hardened decoder of
  the HTTP API (``serving/request.py`` ``decode_image``); a file that does not decode gets the
  reason in ``error`` and nulls in its task columns.

Columns: ``path``, then per task ``<task>.label``, ``<task>.probability`` (of that label),
``<task>.gflops`` (compute really spent on the row) and, for early-exit tasks, ``<task>.exit_stage``;
then ``error``. Rows come in no particular order: join on ``path``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from ..errors import PetlError
from ..tracking.settings import CHAMPION, TrackingSettings
from .connect import ray_error, ray_session, storage

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------- checks (no Ray)
def list_images(source: str) -> tuple[list[str], object]:
    """``(paths, filesystem)`` of the images under a local folder (recursive), a single local
    file, or an ``s3://`` prefix; the filesystem is what Ray Data reads them with (None: local, or
    S3 through the default AWS resolution). Fails on a missing or image-free input."""
    if source.startswith("s3://"):
        return _list_s3(source)
    root = Path(os.path.expanduser(source))
    if root.is_file():
        return [str(root.resolve())], None
    if not root.is_dir():
        raise PetlError(f"--input {source}: no such file or folder (a folder of images or an s3://bucket/prefix)")
    paths = sorted(str(p.resolve()) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not paths:
        raise PetlError(f"--input {source}: no images in it ({', '.join(IMAGE_EXTS)}, searched recursively)")
    return paths, None


def _list_s3(source: str) -> tuple[list[str], object]:
    import pyarrow.fs

    path, fs = storage(source)  # the MLflow endpoint when MLFLOW_S3_ENDPOINT_URL is set
    try:
        if fs is None:
            fs, path = pyarrow.fs.FileSystem.from_uri(source)
        infos = fs.get_file_info(pyarrow.fs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
    except (OSError, ValueError) as e:
        raise PetlError(f"--input {source}: cannot list it ({str(e).splitlines()[0][:200]})") from None
    paths = sorted(i.path for i in infos if i.type == pyarrow.fs.FileType.File and i.path.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise PetlError(f"--input {source}: no images under this prefix ({', '.join(IMAGE_EXTS)})")
    return paths, fs


def check_output(output: str) -> Path:
    """The output file, once its folder exists and takes a file."""
    if "://" in output:
        raise PetlError(f"--output {output}: write to a local .parquet file (upload it afterwards)")
    out = Path(os.path.expanduser(output)).resolve()
    if out.is_dir():
        raise PetlError(f"--output {output} is a folder; name a file, e.g. {out / 'predictions.parquet'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.parent / f".{out.name}.probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise PetlError(f"--output {output}: cannot write there ({e.strerror or e})") from None
    return out


def load_tasks(tasks: list[str], settings: TrackingSettings, stack, alias: str) -> dict:
    """``{task: TaskEntry}`` of every task under ``alias``, loaded on the ``stack``'s backbone and
    readied by its engine (``serving.stack.Stack``): an unregistered task, a missing alias or an
    adapter for another backbone fails here with its reason."""
    cache = stack.store(settings, alias, capacity_mb=1e6)  # every task stays resident
    try:
        out = {}
        for t in tasks:
            try:
                out[t] = cache.get(t, timeout=120)
            except PetlError as e:
                raise PetlError(f"cannot predict {t!r} (alias {alias!r}): {e}; see `petl registry list`") from None
        return out
    finally:
        cache.close()


# ----------------------------------------------------------------------------- the actor
def output_schema(tasks: list[str], runtimes: dict[str, str]):
    import pyarrow as pa

    fields = [pa.field("path", pa.string())]
    for t in tasks:
        fields += [pa.field(f"{t}.label", pa.string()), pa.field(f"{t}.probability", pa.float64()),
                   pa.field(f"{t}.gflops", pa.float64())]
        if runtimes[t] == "early_exit":
            fields.append(pa.field(f"{t}.exit_stage", pa.int64()))
    return pa.schema([*fields, pa.field("error", pa.string())])


class Scorer:
    """Ray Data batch callable: ``{"path", "bytes"}`` -> one row per image (see the module docstring).
    Holds the backbone, the engine and every task's adapter for the actor's lifetime."""

    def __init__(self, tasks: list[str], backbone: str, settings: TrackingSettings, alias: str, threads: int = 0):
        from ..serving.stack import Stack

        if threads:
            torch.set_num_threads(threads)
        stack = Stack.build(backbone)  # on the actor's GPU when it has one
        self.engine, self.transform = stack.engine, stack.transform
        self.tasks = list(tasks)
        self.entries = load_tasks(self.tasks, settings, stack, alias)
        self.models = {t: e.model for t, e in self.entries.items()}
        self.schema = output_schema(self.tasks, {t: self.engine.info(t, m).runtime for t, m in self.models.items()})

    def __call__(self, batch: dict):
        return score_batch(self.engine, self.transform, self.entries, self.schema,
                           [str(p) for p in batch["path"]], list(batch["bytes"]))


def score_batch(engine, transform, entries: dict, schema, paths: list[str], blobs: list) -> "pyarrow.Table":
    """Decode each image on its own (a bad one gets an ``error``), then one engine call for every
    decoded image x every task."""
    import pyarrow as pa

    from ..serving.request import decode_image
    from ..inference.engine import Row

    cols = {name: [None] * len(paths) for name in schema.names}
    cols["path"] = paths
    xs, where = [], []
    for i, data in enumerate(blobs):
        try:
            xs.append(decode_image(bytes(data), transform))
            where.append(i)
        except PetlError as e:
            cols["error"][i] = str(e)
    if xs:
        tasks = list(entries)
        rows = [Row(j, t) for j in range(len(xs)) for t in tasks]
        results = engine.run(torch.stack(xs), rows, {t: e.model for t, e in entries.items()})
        for row, r in zip(rows, results):
            i, classes = where[row.image], entries[row.task].classes
            p, k = r.logits.float().softmax(-1).max(-1)
            cols[f"{row.task}.label"][i] = classes[int(k)]
            cols[f"{row.task}.probability"][i] = float(p)
            cols[f"{row.task}.gflops"][i] = float(r.compute["gflops"])
            if f"{row.task}.exit_stage" in cols:
                cols[f"{row.task}.exit_stage"][i] = r.exit_stage
    return pa.table(cols, schema=schema)


# ----------------------------------------------------------------------------- the run
def _actors(concurrency: int | None) -> dict:
    """``map_batches`` resources: one GPU per actor when the cluster has GPUs; on CPUs, one CPU is
    left to the read tasks and the rest split over the actors."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 1))
    if gpus:
        return {"concurrency": concurrency or gpus, "num_gpus": 1, "num_cpus": 1, "threads": 0}
    n = concurrency or max(1, (cpus - 1) // 2)
    per = max(1, (cpus - 1) // n)
    return {"concurrency": n, "num_gpus": 0, "num_cpus": per, "threads": per}


def predict_dataset(tasks: list[str], input: str, output: str, settings: TrackingSettings, backbone: str | None = None,
                    alias: str = CHAMPION, batch_size: int = 64, address: str | None = None, progress: bool = True,
                    concurrency: int | None = None) -> dict:
    """Score every image under ``input`` for every task in ``tasks``; write ``output`` (parquet).
    Returns ``{"images", "errors", "wall_s", "img_per_s", "output", "actors"}``."""
    from ..backbones import SHIPPED
    from ..serving.stack import Stack

    tasks = list(dict.fromkeys(t.strip() for t in tasks if t.strip()))
    if not tasks:
        raise PetlError("--tasks needs at least one registered task (comma-separated)")
    if batch_size < 1 or (concurrency is not None and concurrency < 1):
        raise PetlError("--batch-size and --concurrency must be >= 1")
    backbone = backbone or SHIPPED
    paths, fs = list_images(input)
    out = check_output(output)
    entries = load_tasks(tasks, settings, Stack.build(backbone, device=None), alias)  # the check, on the CPU
    from ..methods.registry import spec_of

    schema = output_schema(tasks, {t: spec_of(e.model).runtime for t, e in entries.items()})

    with ray_session(address):
        return _stream(tasks, paths, fs, input.startswith("s3://"), out, schema, settings, backbone, alias,
                       batch_size, progress, concurrency)


def _stream(tasks, paths, fs, s3, out, schema, settings, backbone, alias, batch_size, progress, concurrency) -> dict:
    import pyarrow.parquet as pq
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    res = _actors(concurrency)
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    images = errors = 0
    try:
        ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs)
        ds = ds.map_batches(Scorer, batch_size=batch_size, batch_format="numpy", concurrency=res["concurrency"],
                            num_gpus=res["num_gpus"], num_cpus=res["num_cpus"],
                            fn_constructor_kwargs={"tasks": tasks, "backbone": backbone, "settings": settings,
                                                   "alias": alias, "threads": res["threads"]})
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if s3:  # Ray reports S3 keys as bucket/key
                    import pyarrow as pa

                    table = table.set_column(0, "path", pa.array([f"s3://{p}" for p in table.column("path").to_pylist()],
                                                                 pa.string()))
                table = table.select(schema.names).cast(schema)
                writer.write_table(table)
                images += table.num_rows
                errors += table.num_rows - table.column("error").null_count
    except Exception as e:  # noqa: BLE001 - a Ray failure: the user's error if it was one, else its root cause
        tmp.unlink(missing_ok=True)
        raise ray_error(e, "prediction") from None
    os.replace(tmp, out)
    wall = time.perf_counter() - t0
    return {"images": images, "errors": errors, "wall_s": round(wall, 3), "img_per_s": round(images / wall, 2),
            "output": str(out), "actors": res["concurrency"], "device": "gpu" if res["num_gpus"] else "cpu"}
