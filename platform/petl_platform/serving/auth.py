"""API keys for the ingress: ``Authorization: Bearer <key>``; each key may use every task (``*``)
or a list. Keys come from ``PETL_API_KEYS`` (``key1=*;key2=digits-1k,norb_azimuth-1k``) or the JSON
file named by ``PETL_API_KEYS_FILE`` (``{"key1": "*", "key2": ["digits-1k"]}``, e.g. a mounted
Kubernetes Secret). With no keys configured the ingress refuses every request; a malformed value
(``*`` beside task names, ``key=`` inside a task list, an empty task list) is a ``PetlError`` at
start-up."""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

from ..errors import PetlError
from .request import ServeError


_FORMAT = ("expected PETL_API_KEYS='key1=*;key2=task1,task2' (entries separated by ';', "
           "each KEY=* for every task or KEY=TASK,TASK,...)")
_FILE_FORMAT = 'expected {"key1": "*", "key2": ["task1", "task2"]}'


def _add(keys: dict, key: str, tasks: list[str], where: str, fmt: str = _FORMAT) -> None:
    """Validate one key's task list (``["*"]`` or task names) and add it to ``keys``."""
    tasks = [t for t in tasks if t]  # a stray ',' is harmless
    if key in keys:
        raise PetlError(f"{where}: the same key is listed twice; {fmt}")
    if not tasks:
        raise PetlError(f"{where}: empty task list (use * for every task); {fmt}")
    if any("=" in t for t in tasks):
        raise PetlError(f"{where}: 'KEY=' inside a task list (separate keys with ';', not ','); {fmt}")
    if "*" in tasks and len(tasks) > 1:
        raise PetlError(f"{where}: '*' beside task names ('*' alone means every task); {fmt}")
    keys[key] = None if tasks == ["*"] else set(tasks)


class ApiKeys:
    def __init__(self, keys: dict[str, set[str] | None]):
        self.keys = keys  # key -> allowed tasks (None: all)

    @classmethod
    def parse(cls, text: str) -> "ApiKeys":
        """``key1=*;key2=task1,task2``; a malformed value is a ``PetlError`` (raised at start-up,
        so a typo never becomes a key that may use nothing or everything). Messages name the
        entry by position and never echo a key."""
        keys: dict[str, set[str] | None] = {}
        for i, part in enumerate(filter(None, (p.strip() for p in text.split(";"))), 1):
            key, sep, tasks = part.partition("=")
            where = f"PETL_API_KEYS entry {i}"
            if not key.strip():
                raise PetlError(f"{where}: empty key; {_FORMAT}")
            if not sep:
                raise PetlError(f"{where}: no '=' after the key; {_FORMAT}")
            _add(keys, key.strip(), [t.strip() for t in tasks.split(",")], where)
        return cls(keys)

    @classmethod
    def from_env(cls) -> "ApiKeys":
        path = os.environ.get("PETL_API_KEYS_FILE")
        if path:
            try:
                raw = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise PetlError(f"PETL_API_KEYS_FILE {path}: {e}") from None
            if not isinstance(raw, dict):
                raise PetlError(f"PETL_API_KEYS_FILE {path}: not a JSON object; {_FILE_FORMAT}")
            keys: dict[str, set[str] | None] = {}
            for i, (key, tasks) in enumerate(raw.items(), 1):
                where = f"PETL_API_KEYS_FILE {path} key {i}"
                if not key.strip():
                    raise PetlError(f"{where}: empty key; {_FILE_FORMAT}")
                if tasks != "*" and not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
                    raise PetlError(f'{where}: tasks must be "*" or a list of task names; {_FILE_FORMAT}')
                _add(keys, key.strip(), ["*"] if tasks == "*" else [t.strip() for t in tasks], where,
                     _FILE_FORMAT)
            return cls(keys)
        return cls.parse(os.environ.get("PETL_API_KEYS", ""))

    def check(self, authorization: str | None, tasks: list[str] | None = None) -> str:
        """The caller's key; 401 without a valid one, 403 for a task the key may not use.

        A restricted key gets 403 for every task outside its list, served or not, so it cannot
        probe which other tasks exist (a 404 would tell it)."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ServeError(401, "missing API key: send 'Authorization: Bearer <key>'")
        key = key.strip()
        allowed = next((v for k, v in self.keys.items() if hmac.compare_digest(k.encode(), key.encode())), False)
        if allowed is False:
            raise ServeError(401, "invalid API key")
        denied = [t for t in tasks or [] if allowed is not None and t not in allowed]
        if denied:
            raise ServeError(403, f"this API key may not use task(s) {', '.join(denied)}")
        return key

    def visible(self, key: str, tasks) -> list[str]:
        """Those of ``tasks`` that ``key`` (already checked) may use and see, in order."""
        allowed = self.keys.get(key)
        return [t for t in tasks if allowed is None or t in allowed]
