"""``petl demo`` and ``petl bench``: the whole platform end to end, and every benchmark side by side."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import PetlError


def cmd_demo(args) -> None:
    from ..demo import run_demo

    run_demo(tasks=args.tasks.split(","), methods=args.methods.split(","), backbone=args.backbone, epochs=args.epochs,
             petl=[m for m in args.petl.split(",") if m], budget=args.budget, sweep=args.sweep or None)


def cmd_bench(args) -> None:
    import subprocess

    script = Path(__file__).resolve().parents[3] / "bench" / "report.py"
    if not script.exists():
        raise PetlError(f"petl bench runs the bench/ scripts of a source checkout (pip install -e .): {script} not found")
    argv = [*(["--quick"] if args.quick else []), *(["--report"] if args.report else []),
            *(["--only", args.only] if args.only else []), *(["--out", args.out] if args.out else [])]
    rc = subprocess.call([sys.executable, str(script), *argv])
    if rc:
        raise SystemExit(rc)
