"""petl-platform: many vision tasks on one frozen ViT with parameter-efficient fine-tuning.

The names below load on first use (PEP 562), so importing one light module of the package (a
decode task's ``cluster.decode``, ``imaging``) does not import torch and timm with it."""

from importlib import import_module

from .version import __version__

_LAZY = {  # name -> the module that defines it
    "SHIPPED": ".backbones", "create_backbone": ".backbones", "fingerprint": ".backbones",
    "PetlError": ".errors",
    "build_model": ".methods", "get_method": ".methods", "list_methods": ".methods",
    "load_adapter": ".tracking", "save_adapter": ".tracking",
}

__all__ = ["SHIPPED", "PetlError", "build_model", "create_backbone", "fingerprint", "get_method",
           "list_methods", "load_adapter", "save_adapter", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
    else:
        try:  # a subpackage not imported yet: ``petl_platform.methods`` after ``import petl_platform``
            value = import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
