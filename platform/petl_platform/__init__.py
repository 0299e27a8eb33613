"""petl-platform: many vision tasks on one frozen ViT with parameter-efficient fine-tuning."""

from .version import __version__
from .backbones import SHIPPED, create_backbone, fingerprint  # noqa: E402
from .errors import PetlError  # noqa: E402
from .methods import build_model, get_method, list_methods  # noqa: E402
from .tracking import load_adapter, save_adapter  # noqa: E402

__all__ = ["SHIPPED", "PetlError", "build_model", "create_backbone", "fingerprint", "get_method",
           "list_methods", "load_adapter", "save_adapter", "__version__"]
