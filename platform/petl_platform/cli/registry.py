"""``petl registry list | show | promote``: the MLflow model registry and its aliases."""

from __future__ import annotations

import json

from ..errors import PetlError
from .common import tracking_settings


def cmd_registry(args) -> None:
    from ..tracking import runs

    settings = tracking_settings(args)
    if args.action == "list":
        out = runs.list_models(settings)
    elif args.action == "show":
        if not args.ref:
            raise PetlError("petl registry show needs NAME[@ALIAS|/VERSION]")
        out = runs.show_model(settings, args.ref)
    else:
        if not args.ref or args.version is None:
            raise PetlError("petl registry promote needs NAME VERSION")
        out = runs.promote(settings, args.ref, args.version, args.alias)
    if args.json:
        print(json.dumps(out, default=str))
    elif args.action == "list":
        for r in out:
            aliases = ", ".join(f"{a}→v{v}" for a, v in r["aliases"].items()) or "-"
            print(f"{r['name']:24} versions {r['versions']}  aliases {aliases}")
    else:
        print(f"{out['name']} v{out['version']} aliases {out['aliases'] or '-'} run {out['run_id']}\n  {out['source']}")
        if out["tags"].get("petl.promotion"):
            print(f"  {out['tags']['petl.promotion']}")
