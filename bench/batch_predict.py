"""`petl predict` throughput: ``predict_dataset`` (Ray Data, actors each holding the backbone and
every task) against the in-process mixed-task engine at the same batch size on the same decoded
images, on the shipped backbone with N LoRA tasks (the hard case: a per-row adapter delta at every
site, nothing shared past the frozen ops) registered in a temporary MLflow (SQLite + local store).

The Ray figure is end to end: file reads, per-image decoding, engine calls and the parquet write,
plus the actors' start-up (backbone + adapters loaded per actor); the in-process figure is engine
calls only, on images decoded beforehand. The ratio is what the Ray Data path costs (or gains,
with more actors than one process can use) over a bare loop.

    .venv/bin/python bench/batch_predict.py [--quick] [--images N] [--tasks N] [--batch 64] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from petl_platform import build_model, create_backbone
from petl_platform.backbones import SHIPPED
from petl_platform.data import make_transform
from petl_platform.cluster.batch import predict_dataset
from petl_platform.inference import Engine, Row
from petl_platform.tracking.runs import log_and_register
from petl_platform.tracking.settings import TrackingSettings


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 images, 1 in-process round")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="in-process rounds (median)")
    ap.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    n, rounds = (128, 1) if args.quick else (args.images, args.rounds)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory(prefix="petl-bench-predict-") as tmp:
        root = Path(tmp)
        settings = TrackingSettings(f"sqlite:///{root / 'm.db'}", str(root / "art"), str(root / "ray")).prepare()
        os.environ.update({"MLFLOW_TRACKING_URI": settings.tracking_uri, "PETL_ARTIFACT_ROOT": settings.artifact_root})
        bb = create_backbone(SHIPPED)
        tasks = {}
        for i in range(args.tasks):
            torch.manual_seed(i)
            tasks[f"bench-lora-{i}"] = build_model("lora", bb, 10)
            log_and_register(settings, tasks[f"bench-lora-{i}"], f"bench-lora-{i}", [str(c) for c in range(10)])
        size = tuple(bb.patch_embed.img_size)
        rng = np.random.default_rng(0)
        folder = root / "images"
        folder.mkdir()
        blobs = []
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
            blobs.append(buf.getvalue())
            (folder / f"{i:05d}.png").write_bytes(blobs[-1])

        # in-process: the engine alone, same batch size, images decoded beforehand
        tf = make_transform(bb)
        x = torch.stack([tf(Image.open(io.BytesIO(b)).convert("RGB")) for b in blobs])
        engine = Engine(bb)
        names = list(tasks)
        engine.run(x[:2], [Row(0, t) for t in names], tasks)  # warm: FLOP counts, mixed ViT
        walls = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for a in range(0, n, args.batch):
                xb = x[a:a + args.batch]
                engine.run(xb, [Row(j, t) for j in range(len(xb)) for t in names], tasks)
            walls.append(time.perf_counter() - t0)
        local = n / sorted(walls)[len(walls) // 2]

        summary = predict_dataset(names, str(folder), str(root / "out.parquet"), settings, backbone=SHIPPED,
                                  batch_size=args.batch, progress=False)

    result = {"backbone": SHIPPED, "tasks": args.tasks, "method": "lora", "images": n, "batch": args.batch,
              "cpus": os.cpu_count(), "gpu": torch.cuda.is_available(), "quick": args.quick,
              "in_process_img_per_s": round(local, 2), "in_process_rounds": rounds,
              "ray_data_img_per_s": summary["img_per_s"], "ray_data_wall_s": summary["wall_s"],
              "ray_data_actors": summary["actors"], "ray_data_device": summary["device"],
              "errors": summary["errors"], "ratio": round(summary["img_per_s"] / local, 3)}
    (out_dir / "batch_predict.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
