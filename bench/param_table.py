"""Trainable parameters (task head excluded, ``model.num_trainable()``) of every registered method
on the ViT-B/16 configuration (random weights, no download), next to the papers' figures.

Prints a table and writes bench/results/param_table.json. ``flag`` marks a gap of more than 20 %
between our count and the paper's figure. Some papers' tables include the task head: the column
``with_vtab_head_m`` adds the mean VTAB-1k linear head (768 x 49.5 classes + bias, 0.038 M; the
"linear probing" rows of those tables show it as 0.04 M) so such figures can be compared too.

Usage: nice .venv/bin/python bench/param_table.py
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from petl_platform import build_model, create_backbone, list_methods

PAPER_M = {  # the papers' VTAB-1k ViT-B/16 figures, millions of trainable parameters
    "lora": 0.29, "adapter": 0.16, "repadapter": 0.22, "arc": 0.13, "arc_att": 0.08,
    "dtl": 0.04, "dtl_plus": 0.05, "dyt": 0.16,
}
# VTAB-1k class counts: natural 7, specialized 4, structured 8 tasks
VTAB_CLASSES = [100, 102, 47, 102, 37, 10, 397, 2, 10, 45, 5, 8, 6, 6, 4, 16, 16, 18, 9]
NOTES = {
    "arc": "ARC's table counts the task head (its linear-probing row, head only, is 0.04 M)",
    "arc_att": "ARC's table counts the task head (its linear-probing row, head only, is 0.04 M)",
}
GAP = 0.20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(Path(__file__).parent / "results"), help="where the JSON goes")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    backbone = create_backbone("vit_base_patch16_224")
    width = backbone.embed_dim
    mean_classes = sum(VTAB_CLASSES) / len(VTAB_CLASSES)
    vtab_head = width * mean_classes + mean_classes
    rows = []
    for method in list_methods():
        model = build_model(method, backbone, 100)
        n = model.num_trainable()
        paper = PAPER_M.get(method)
        ratio = n / (paper * 1e6) if paper else None
        rows.append({
            "method": method, "trainable": n, "trainable_m": round(n / 1e6, 4),
            "with_vtab_head_m": round((n + vtab_head) / 1e6, 4), "paper_m": paper,
            "ratio": None if ratio is None else round(ratio, 3),
            "flag": ratio is not None and abs(ratio - 1) > GAP, "note": NOTES.get(method, ""),
        })
        del model
    print(f"ViT-B/16 ({sum(p.numel() for p in backbone.parameters()) / 1e6:.2f} M frozen), head excluded; "
          f"mean VTAB-1k head = {vtab_head / 1e6:.4f} M ({mean_classes:.1f} classes)")
    print(f"{'method':<16}{'trainable':>11}{'M':>9}{'+head M':>9}{'paper M':>9}{'ratio':>8}  flag")
    for r in rows:
        paper = "-" if r["paper_m"] is None else f"{r['paper_m']:.2f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['method']:<16}{r['trainable']:>11,}{r['trainable_m']:>9.3f}{r['with_vtab_head_m']:>9.3f}"
              f"{paper:>9}{ratio:>8}  {'GAP>20%' if r['flag'] else ''}{'  (' + r['note'] + ')' if r['note'] else ''}")
    out = Path(args.out_dir) / "param_table.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"backbone": "vit_base_patch16_224", "width": width, "depth": len(backbone.blocks),
                               "mean_vtab_head": round(vtab_head), "gap_threshold": GAP, "rows": rows,
                               "wall_s": round(time.perf_counter() - t0, 1)}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
