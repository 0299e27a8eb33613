"""Ray job entrypoint for a sweep: ``python -m jobs.sweep --task T[,T2] --method M --space ...``
(what ``petl submit sweep`` and the KubeRay RayJob run; the arguments are those of ``petl sweep``)."""

import sys

from petl_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
