"""``petl tasks`` and ``petl methods``: what there is to train on, and with."""

from __future__ import annotations

import json


def _vtab_tasks(args) -> None:
    from ..data.vtab import discover

    rows = discover(args.vtab_root)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'dataset':22} {'group':11} {'classes':>7} {'train800':>8} {'val200':>6} {'train800val200':>14} {'test':>7}  task")
    for r in rows:
        s = r["sizes"]
        print(f"{r['name']:22} {r['group']:11} {r['num_classes']:>7} {s['train800']:>8} {s['val200']:>6} "
              f"{s['train800val200']:>14} {s['test']:>7}  {r['task']}")
    print(f"{sum(r['group'] != 'other' for r in rows)} of 19 VTAB-1k datasets present")


def cmd_tasks(args) -> None:
    from ..data import get_task, list_tasks

    if args.vtab_root:
        return _vtab_tasks(args)
    names = args.names or list_tasks(include_variants=args.variants)
    infos = [get_task(n).info() for n in names]
    if args.json:
        print(json.dumps(infos, indent=2))
        return
    print(f"{'task':22} {'classes':>7} {'train':>7} {'val':>6} {'test':>6}  source")
    for i in infos:
        s = i["sizes"]
        print(f"{i['name']:22} {i['num_classes']:>7} {s['train']:>7} {s['val']:>6} {s['test']:>6}  {i['source']}")


def cmd_methods(args) -> None:
    from ..backbones import create_backbone
    from ..methods import build_model, get_method, list_methods

    bb = create_backbone(args.backbone)
    rows = []
    for name in list_methods():
        spec = get_method(name)
        model = build_model(name, bb, num_classes=10)
        rows.append({"name": name, "trainable_params": model.num_trainable(), "mergeable": spec.mergeable,
                     "runtime": spec.runtime, "shares_trunk": spec.shares_trunk, "hparams": model.config.to_dict(),
                     "description": spec.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'method':14} {'trainable':>10} {'mergeable':>9} {'runtime':>15}  description")
    for r in rows:
        print(f"{r['name']:14} {r['trainable_params']:>10,} {str(r['mergeable']):>9} {r['runtime']:>15}  {r['description']}")
