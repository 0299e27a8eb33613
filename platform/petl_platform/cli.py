"""``petl``: thin subcommands over the library. Bad input → one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings

from .errors import PetlError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + traceback
        raise PetlError(f"{message} (see '{self.prog} --help')")


def _parse_sets(pairs: list[str]) -> dict:
    out = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PetlError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def cmd_tasks(args) -> None:
    from .data import get_task, list_tasks

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
    from .backbones import create_backbone
    from .methods import build_model, get_method, list_methods

    bb = create_backbone(args.backbone)
    rows = []
    for name in list_methods():
        spec = get_method(name)
        model = build_model(name, bb, num_classes=10)
        rows.append({"name": name, "trainable_params": model.num_trainable(), "mergeable": spec.mergeable,
                     "shares_trunk": spec.shares_trunk, "hparams": model.config.to_dict(),
                     "description": spec.description})
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'method':14} {'trainable':>10} {'mergeable':>9} {'shares_trunk':>12}  description")
    for r in rows:
        print(f"{r['name']:14} {r['trainable_params']:>10,} {str(r['mergeable']):>9} {str(r['shares_trunk']):>12}  {r['description']}")


def cmd_train(args) -> None:
    from .training.run import run_finetune

    result = run_finetune(args.task, args.method, backbone=args.backbone, hparams=_parse_sets(args.set),
                          train_overrides=_train_overrides(args), out=args.out, budget=args.budget)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.task} / {args.method}: test accuracy {result['accuracy']:.4f} (val {result['val_accuracy']:.4f}), "
              f"{result['trainable_params']:,} trainable params, {result['wall_s']:.1f}s, peak {result['peak_mem_mb']:.0f} MB")
        if "calibration" in result:
            d = result["dynamic_test"]
            print(f"early exit at budget {args.budget}: test accuracy {d['accuracy']:.4f} at {d['flops_fraction']:.0%} of "
                  f"full-depth FLOPs, exits per stage {[round(f, 2) for f in d['exit_fractions']]}")
        elif "dynamic_test" in result:
            print(f"token dispatch: measured activation rate {result['dynamic_test']['activation_rate']:.2f}, "
                  f"{result['dynamic_test']['flops_ratio']:.0%} of dense FLOPs")
        if args.out:
            print(f"adapter saved to {args.out}")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(tasks=args.tasks.split(","), methods=args.methods.split(","), backbone=args.backbone, epochs=args.epochs,
             petl=[m for m in args.petl.split(",") if m], budget=args.budget)


def _train_overrides(args) -> dict:
    keys = ("epochs", "batch_size", "lr", "seed", "device")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def build_parser() -> argparse.ArgumentParser:
    from .backbones import SHIPPED

    p = _Parser(prog="petl", description="PETL fine-tuning and serving on one frozen ViT")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)

    t = sub.add_parser("tasks", help="list offline tasks")
    t.add_argument("names", nargs="*", help="only these tasks (default: all)")
    t.add_argument("--json", action="store_true")
    t.add_argument("--no-variants", dest="variants", action="store_false", help="omit the -1k variants")
    t.set_defaults(fn=cmd_tasks)

    m = sub.add_parser("methods", help="list PETL methods with trainable-parameter counts")
    m.add_argument("--backbone", default=SHIPPED)
    m.add_argument("--json", action="store_true")
    m.set_defaults(fn=cmd_methods)

    tr = sub.add_parser("train", help="fine-tune one task with one method (local, plain torch)")
    tr.add_argument("--task", required=True, help="registry name, NAME-1k, or folder:PATH")
    tr.add_argument("--method", default="linear")
    tr.add_argument("--backbone", default=SHIPPED, help="shipped name, timm ViT name, weights file, or ARCH@FILE")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--batch-size", type=int)
    tr.add_argument("--lr", type=float)
    tr.add_argument("--seed", type=int)
    tr.add_argument("--device")
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="method hyperparameter (repeatable)")
    tr.add_argument("--budget", type=float, help="dyn_* methods: calibrate exits to this fraction of full-depth FLOPs")
    tr.add_argument("--out", help="save the adapter artifact to this directory")
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(fn=cmd_train)

    d = sub.add_parser("demo", help="fine-tune a few offline tasks on the shipped backbone and print a table")
    d.add_argument("--tasks", default="digits-1k,dsprites_loc-1k,clevr_count-1k")
    d.add_argument("--methods", default="linear")
    d.add_argument("--backbone", default=SHIPPED)
    d.add_argument("--epochs", type=int)
    d.add_argument("--petl", default="dtl,dyn_lora", help="PETL methods fine-tuned on the first task ('' to skip)")
    d.add_argument("--budget", type=float, default=0.5, help="FLOPs budget the dyn_* exits are calibrated to")
    d.set_defaults(fn=cmd_demo)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        args = build_parser().parse_args(argv)
        args.fn(args)
    except PetlError as e:
        print(f"petl: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `petl tasks --json | head`
        return 0
    except KeyboardInterrupt:
        print("petl: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
