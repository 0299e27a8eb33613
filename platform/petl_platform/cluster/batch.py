"""Offline scoring (``petl predict``): a folder or an ``s3://`` prefix of images through Ray Data,
every image answered for every task, one parquet file out.

- **Checked before Ray starts** (one ``PetlError`` line each): the tasks resolve under the alias
  and load on the backbone (the same store a Serve replica uses, ``serving/models.py``), the input
  holds at least one image, the output's folder is writable.
- **Streamed:** ``read_binary_files`` -> ``map_batches(decode_batch)`` (``cluster/decode.py``),
  tasks that decode each image to ``uint8`` pixels at the model's size beside the actors, with
  Pillow and NumPy alone (no torch to import) -> ``map_batches`` with a
  callable class. Each actor holds the frozen backbone once, every task's adapter from the MLflow
  registry, and the mixed-task engine (``inference/engine.py``), which normalizes the pixels on its
  device: one engine call per batch answers every image for every task. GPU actors
  (``num_gpus=1``) when the cluster has GPUs, else CPU actors sized to the cluster (``_actors``).
  The driver writes the result batches to one parquet file as they arrive (``<output>.tmp``
  renamed at the end, so a failed run never leaves half a file behind).
- **A bad image never stops the run:** each row is decoded on its own with the hardened decoder of
  the HTTP API (``imaging.open_rgb``); a file that does not decode gets the
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
from .decode import decode_batch
from .trainer import release_idle_trainers

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


def load_tasks(tasks: list[str], settings: TrackingSettings, stack, alias: str, shipped: dict | None = None,
               keep: dict | None = None) -> dict:
    """``{task: TaskEntry}`` of every task under ``alias``, loaded on the ``stack``'s backbone and
    readied by its engine (``serving.stack.Stack``): an unregistered task, a missing alias or an
    adapter for another backbone fails here with its reason.

    ``keep``: filled with what was fetched (``{ref: serving.models.Fetched}``); ``shipped``: such a
    dict, used instead of the registry. The driver fetches once and the actors load what it
    fetched: every actor scores the same versions even if an alias moves during the run, and no
    actor needs MLflow or S3."""
    from ..serving.models import fetch_from_registry

    fp, name = getattr(stack.backbone, "fingerprint", None), str(getattr(stack.backbone, "petl_name", "?"))

    def fetch(ref: str):
        if shipped is not None:
            return shipped[ref]
        got = fetch_from_registry(settings, ref, fp, name)
        if keep is not None:
            keep[ref] = got
        return got

    cache = stack.store(settings, alias, capacity_mb=1e6, fetch=fetch)  # every task stays resident
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
    """Ray Data batch callable: ``{"path", "pixels", "error"}`` (``decode_batch``'s) -> one row per
    image (see the module docstring). Holds the backbone, the engine and every task's adapter for
    the actor's lifetime."""

    def __init__(self, tasks: list[str], backbone: str, settings: TrackingSettings, alias: str, threads: int = 0,
                 shipped: dict | None = None):
        from ..serving.stack import Stack

        if threads:
            torch.set_num_threads(threads)
        stack = Stack.build(backbone)  # on the actor's GPU when it has one
        self.engine = stack.engine
        self.tasks = list(tasks)
        self.entries = load_tasks(self.tasks, settings, stack, alias, shipped=shipped)
        self.schema = output_schema(self.tasks, {t: self.engine.info(t, e.model).runtime for t, e in self.entries.items()})

    def __call__(self, batch: dict):
        u8 = batch["pixels"]  # read-only when Ray hands it over zero-copy: the engine only reads it
        return score_pixels(self.engine, self.entries, self.schema, [str(p) for p in batch["path"]],
                            torch.from_numpy(u8 if u8.flags.writeable else u8.copy()), list(batch["error"]))


def score_pixels(engine, entries: dict, schema, paths: list[str], pixels: torch.Tensor,
                 errors: list) -> "pyarrow.Table":
    """One engine call for every decoded image x every task; ``pixels`` ``uint8 [B, 3, H, W]``, and
    a row whose ``errors`` entry is set (it did not decode) keeps its error and nulls."""
    import pyarrow as pa

    from ..inference.engine import Row

    cols = {name: [None] * len(paths) for name in schema.names}
    cols["path"] = paths
    where = []
    for i, err in enumerate(errors):
        # an all-null error column comes back from Arrow as None or NaN: only a message is an error
        if isinstance(err, str) and err:
            cols["error"][i] = err
        else:
            where.append(i)
    if where:
        tasks = list(entries)
        rows = [Row(j, t) for j in range(len(where)) for t in tasks]
        x = pixels if len(where) == len(paths) else pixels[torch.as_tensor(where)]
        results = engine.run(x, rows, {t: e.model for t, e in entries.items()})
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
DECODE_CPUS = 0.25  # a decode task's CPU share: PNG/JPEG decoding is light next to the engine


def _actors(concurrency: int | None) -> dict:
    """``map_batches`` resources of the scoring actors, sized to the cluster.

    - GPUs: one actor per GPU, one CPU each; the decode tasks take the CPUs left.
    - CPUs only: one actor per 4 CPUs of the largest node (``--concurrency`` overrides), each with
      as many torch threads as its share of the cluster's CPUs, so the actors together use every
      core (Ray would give an actor of fewer than 2 CPUs one thread). Their CPU reservation leaves
      room for the decode tasks (``DECODE_CPUS`` each) to run beside them, so decoding overlaps
      the engine instead of waiting for it."""
    import ray

    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    node = max((float(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")), default=cpus) or cpus
    if gpus:
        return {"concurrency": concurrency or gpus, "num_gpus": 1, "num_cpus": 1, "threads": 0}
    n = concurrency or max(1, int(cpus // 4))
    reserve = min(1.0, 2 * DECODE_CPUS * max(1.0, cpus / 4))  # room for two decode tasks per 4 CPUs
    per = max(0.5, min(node - DECODE_CPUS, (cpus - reserve) / n))
    return {"concurrency": n, "num_gpus": 0, "num_cpus": round(per, 2), "threads": max(1, round(cpus / n))}


def predict_dataset(tasks: list[str], input: str, output: str, settings: TrackingSettings, backbone: str | None = None,
                    alias: str = CHAMPION, batch_size: int = 64, address: str | None = None, progress: bool = True,
                    concurrency: int | None = None) -> dict:
    """Score every image under ``input`` for every task in ``tasks``; write ``output`` (parquet).
    Returns ``{"images", "errors", "wall_s", "img_per_s", "first_result_s", "output", "actors",
    "threads", "device"}``: ``first_result_s``, when the driver received the first scored batch."""
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
    stack = Stack.build(backbone, device=None)
    shipped: dict = {}
    entries = load_tasks(tasks, settings, stack, alias, keep=shipped)  # the check, on the CPU
    from ..data import Pixels
    from ..methods.registry import spec_of

    schema = output_schema(tasks, {t: spec_of(e.model).runtime for t, e in entries.items()})
    pixels = Pixels(stack.transform, stack.image_size)
    geometry = pixels.light or pixels  # what the decode tasks need of the model: no weights, no torch if light

    with ray_session(address):
        release_idle_trainers()  # their CPUs go to the decode tasks and the scoring actors
        return _stream(tasks, paths, fs, input.startswith("s3://"), out, schema, settings, backbone, alias,
                       batch_size, progress, concurrency, geometry, shipped)


def _stream(tasks, paths, fs, s3, out, schema, settings, backbone, alias, batch_size, progress, concurrency,
            geometry, shipped) -> dict:
    import pyarrow.parquet as pq
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    res = _actors(concurrency)
    t0 = time.perf_counter()
    tmp = out.with_name(out.name + ".tmp")
    images = errors = 0
    first = (0.0, 0)
    try:
        # Decoding runs in tasks beside the actors: the engine never waits on Pillow. Reads take a
        # decode task's CPU share (Ray's default, 1 CPU, would wait behind the actors' reservation),
        # and decoding takes whole read blocks, so Ray Data fuses the two into one task per block.
        ds = ray.data.read_binary_files(paths, include_paths=True, filesystem=fs, num_cpus=DECODE_CPUS)
        ds = ds.map_batches(decode_batch, batch_size=None, batch_format="numpy", num_cpus=DECODE_CPUS,
                            fn_kwargs={"geometry": geometry})
        ds = ds.map_batches(Scorer, batch_size=batch_size, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=res["concurrency"]),
                            num_gpus=res["num_gpus"], num_cpus=res["num_cpus"],
                            fn_constructor_kwargs={"tasks": tasks, "backbone": backbone, "settings": settings,
                                                   "alias": alias, "threads": res["threads"],
                                                   "shipped": shipped})
        with pq.ParquetWriter(str(tmp), schema) as writer:
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if s3:  # Ray reports S3 keys as bucket/key
                    import pyarrow as pa

                    table = table.set_column(0, "path", pa.array([f"s3://{p}" for p in table.column("path").to_pylist()],
                                                                 pa.string()))
                table = table.select(schema.names).cast(schema)
                writer.write_table(table)
                if not images:  # the pipeline's start-up and its first batch, as the driver sees it
                    first = (time.perf_counter() - t0, table.num_rows)
                images += table.num_rows
                errors += table.num_rows - table.column("error").null_count
    except Exception as e:  # noqa: BLE001 - a Ray failure: the user's error if it was one, else its root cause
        tmp.unlink(missing_ok=True)
        raise ray_error(e, "prediction") from None
    os.replace(tmp, out)
    wall = time.perf_counter() - t0
    return {"images": images, "errors": errors, "wall_s": round(wall, 3), "img_per_s": round(images / wall, 2),
            "first_result_s": round(first[0], 3),
            "output": str(out), "actors": res["concurrency"], "threads": res["threads"],
            "device": "gpu" if res["num_gpus"] else "cpu"}
