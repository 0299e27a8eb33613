"""API keys for the ingress: ``Authorization: Bearer <key>``; each key may use every task (``*``)
or a list. Keys come from ``PETL_API_KEYS`` (``key1=*;key2=digits-1k,norb_azimuth-1k``) or the JSON
file named by ``PETL_API_KEYS_FILE`` (``{"key1": "*", "key2": ["digits-1k"]}``, e.g. a mounted
Kubernetes Secret). With no keys configured the ingress refuses every request."""

from __future__ import annotations

import hmac
import json
import os
from pathlib import Path

from ..errors import PetlError
from .request import ServeError


class ApiKeys:
    def __init__(self, keys: dict[str, set[str] | None]):
        self.keys = keys  # key -> allowed tasks (None: all)

    @classmethod
    def parse(cls, text: str) -> "ApiKeys":
        keys = {}
        for part in filter(None, (p.strip() for p in text.split(";"))):
            key, sep, tasks = part.partition("=")
            if not key.strip():
                raise PetlError("PETL_API_KEYS: empty key; format key1=*;key2=task1,task2")
            tasks = tasks.strip() or "*"
            keys[key.strip()] = None if tasks == "*" else {t.strip() for t in tasks.split(",") if t.strip()}
        return cls(keys)

    @classmethod
    def from_env(cls) -> "ApiKeys":
        path = os.environ.get("PETL_API_KEYS_FILE")
        if path:
            try:
                raw = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise PetlError(f"PETL_API_KEYS_FILE {path}: {e}") from None
            return cls({k: None if v == "*" else set(v) for k, v in raw.items()})
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
