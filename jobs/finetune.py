"""Ray job entrypoint for one fine-tune: ``python -m jobs.finetune --task T --method M ...``
(what ``petl submit train`` runs on the cluster; the arguments are those of ``petl train``)."""

import sys

from petl_platform.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
