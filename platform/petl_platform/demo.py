"""``petl demo``: the main job with embedded defaults, end to end on one machine."""

from __future__ import annotations

import time

from .backbones import create_backbone
from .data import check_task_name
from .methods import get_method
from .training.run import run_finetune


def run_demo(tasks: list[str], methods: list[str], backbone: str, epochs: int | None = None) -> list[dict]:
    for t in tasks:
        check_task_name(t)
    for m in methods:
        get_method(m)
    t0 = time.time()
    bb = create_backbone(backbone)
    print(f"backbone {backbone} (fingerprint {bb.fingerprint}); tasks {', '.join(tasks)}; methods {', '.join(methods)}")
    rows = []
    for task in tasks:
        for method in methods:
            overrides = {"epochs": epochs} if epochs else {}
            r = run_finetune(task, method, backbone, train_overrides=overrides, backbone_model=bb)
            rows.append(r)
            print(f"  {task:20} {method:12} test acc {r['accuracy']:.3f}  ({r['wall_s']:.0f}s)", flush=True)
    print()
    print(f"{'task':20} {'method':12} {'test acc':>8} {'val acc':>8} {'trainable':>10} {'epochs':>6} {'wall s':>7}")
    for r in rows:
        print(f"{r['task']:20} {r['method']:12} {r['accuracy']:>8.3f} {r['val_accuracy']:>8.3f} "
              f"{r['trainable_params']:>10,} {r['epochs']:>6} {r['wall_s']:>7.1f}")
    print(f"\ndemo finished in {time.time() - t0:.0f}s")
    return rows
