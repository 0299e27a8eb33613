"""The method registry: one ``register_method`` call per method folder; duplicates fail loudly."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import unknown
from .config import MethodConfig


@dataclass(frozen=True)
class MethodSpec:
    name: str
    model_cls: type  # a PetlModel subclass
    config_cls: type[MethodConfig]
    mergeable: bool = False
    shares_trunk: bool = False  # leading frozen blocks identical across tasks (see ARCHITECTURE.md)
    description: str = ""
    recipe: dict = field(default_factory=dict)  # default TrainConfig overrides (lr, epochs, ...)


_METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in _METHODS:
        raise ValueError(f"method {spec.name!r} is already registered (by {_METHODS[spec.name].model_cls.__module__})")
    _METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    if name not in _METHODS:
        raise unknown("method", name, _METHODS)
    return _METHODS[name]


def list_methods() -> list[str]:
    return sorted(_METHODS)
