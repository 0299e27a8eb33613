"""PETL methods: one folder each, registered explicitly below (no star imports)."""

from . import linear  # noqa: F401  (each import runs that method's single register_method call)
from . import dyt  # noqa: F401
from . import lora  # noqa: F401
from . import adapter  # noqa: F401
from . import repadapter  # noqa: F401
from . import arc  # noqa: F401
from . import dtl  # noqa: F401
from .base import AdapterModule, PetlModel, adapter_modules, StepOutput, find_modules, replace_module, run_trunk, share_frozen
from .config import MethodConfig, check
from .registry import MethodSpec, get_method, list_methods, register_method


def build_model(method: str, backbone, num_classes: int, **hparams) -> PetlModel:
    """Build task model ``method`` on ``backbone`` (shared, frozen) with the method's hyperparameters."""
    spec = get_method(method)
    config = spec.config_cls.from_dict(hparams, method)
    return spec.model_cls(backbone, num_classes, config, method)


__all__ = ["AdapterModule", "PetlModel", "adapter_modules", "StepOutput", "MethodConfig", "MethodSpec", "build_model", "check", "find_modules",
           "get_method", "list_methods", "register_method", "replace_module", "run_trunk", "share_frozen"]

# Keep last: Dyn-Adapter registers dyn_<base> for every base method imported above.
from .dyn_exit import register_dyn_variants  # noqa: E402
register_dyn_variants()
