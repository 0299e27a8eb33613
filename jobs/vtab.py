"""Ray job entrypoint for the VTAB-1k protocol:
``python -m jobs.vtab --root ROOT --method M --backbone 'vit_base_patch16_224.augreg_in21k@/path/ViT-B_16.npz' ...``

For each dataset under ROOT (``ROOT/<dataset>/{train800,val200,train800val200,test}.txt``, or
``--datasets a,b``): a Ray Tune sweep on train800 → val200, then the best config trained on
train800val200 and tested once on test; one MLflow parent run with every dataset's test accuracy,
the group means and both averages. The other arguments are those of ``petl sweep`` (this is
``petl sweep --suite vtab1k --vtab-root ROOT ...``)."""

import sys

from petl_platform.cli import main


def suite_argv(argv: list[str]) -> list[str]:
    """``--root X`` / ``--root=X`` → ``--vtab-root``, under ``sweep --suite vtab1k``."""
    out = [("--vtab-root" if a == "--root" else "--vtab-root=" + a[len("--root="):] if a.startswith("--root=") else a)
           for a in argv]
    return ["sweep", "--suite", "vtab1k", *out]


if __name__ == "__main__":
    sys.exit(main(suite_argv(sys.argv[1:])))
