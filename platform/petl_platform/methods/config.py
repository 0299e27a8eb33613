"""Method configs: frozen, typed dataclasses that validate on construction and round-trip to JSON."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from ..errors import PetlError


def _coerce(value, typ, key):
    """Turn CLI strings (``--set rank=4``) into the field's declared type."""
    if not isinstance(value, str) or typ is str:
        return value
    try:
        if typ is bool:
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ in (int, float):
            return typ(value)
        if typing.get_origin(typ) in (list, tuple):
            inner = typing.get_args(typ)[0]
            return tuple(inner(v) for v in value.strip("[]()").split(",") if v.strip())
    except ValueError:
        raise PetlError(f"hyperparameter {key}={value!r} is not a valid {getattr(typ, '__name__', typ)}") from None
    return value


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's hyperparameters. Subclasses add typed fields and ``__post_init__`` checks."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict, method: str = "") -> "MethodConfig":
        names = cls.field_names()
        bad = [k for k in values if k not in names]
        if bad:
            valid = ", ".join(names) if names else "none"
            raise PetlError(f"method {method!r} has no hyperparameter {bad[0]!r}; valid: {valid}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], k) for k, v in values.items()}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as e:
            raise PetlError(f"bad hyperparameters for {method!r}: {e}") from None


def check(cond: bool, msg: str) -> None:
    """Raise the ValueError that ``from_dict`` turns into a one-line user error."""
    if not cond:
        raise ValueError(msg)
