"""What the subcommands share: one-line argument errors, ``--set KEY=VALUE``, the tracking
settings (``--tracking-uri``, ``--artifact-root``, ``--storage-path``), the training overrides,
and the one line a registration prints."""

from __future__ import annotations

import argparse

from ..errors import PetlError


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + traceback
        raise PetlError(f"{message} (see '{self.prog} --help')")


def parse_sets(pairs: list[str]) -> dict:
    out = {}
    for item in pairs or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise PetlError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def tracking_settings(args):
    from ..tracking.settings import TrackingSettings

    return TrackingSettings.from_env(getattr(args, "tracking_uri", None), getattr(args, "artifact_root", None),
                                     getattr(args, "storage_path", None))


def print_registered(r: dict) -> None:
    """The champion decision of one registration, in one line."""
    where = f"@{r['alias']}" if r["champion_moved"] else f"@challenger ({r['alias']} stays v{r['champion_version']})"
    print(f"  registered models:/{r['name']}{where} (version {r['version']}): {r['reason']}")


def train_overrides(args) -> dict:
    keys = ("epochs", "batch_size", "lr", "seed", "device")
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
