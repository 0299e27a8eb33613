"""DTL and DTL+ (``papers/dtl-disentangled-transfer.md``): a Compact Side Network beside the
frozen ViT; blocks 1..M are the untouched backbone (no autograd, shareable across tasks)."""

from dataclasses import dataclass

from ..config import MethodConfig, check
from ..registry import MethodSpec, register_method
from .model import CsnLayer, DtlModel, DtlPlusModel, GridConv


@dataclass(frozen=True)
class DtlConfig(MethodConfig):
    """``m``: 1-based first block whose output gets the CSN add-back (Eq. 8; paper default 7, the
    upper bound, the backbone depth, is checked when the model is built); ``rank``: d' of each
    ``w_i = a_i c_i`` (2 for ViT); ``beta``: Swish beta of theta (100)."""

    m: int = 7
    rank: int = 2
    beta: float = 100.0

    def __post_init__(self):
        check(self.m >= 1, f"m must be >= 1 (1-based first adapted block), got {self.m}")
        check(self.rank >= 1, f"rank must be >= 1, got {self.rank}")
        check(self.beta > 0, f"beta must be > 0, got {self.beta}")


@dataclass(frozen=True)
class DtlPlusConfig(DtlConfig):
    """DTL+ adds g: ``kernel_size`` of the shared depthwise conv (3, odd so 'same' padding is
    symmetric); ``pointwise`` adds a C x C 1x1 conv after it (off: the paper's parameter count)."""

    kernel_size: int = 3
    pointwise: bool = False

    def __post_init__(self):
        super().__post_init__()
        check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, f"kernel_size must be odd and >= 1, got {self.kernel_size}")


__all__ = ["CsnLayer", "DtlConfig", "DtlModel", "DtlPlusConfig", "DtlPlusModel", "GridConv"]

# Authors' scripts: AdamW + cosine, lr 1e-3, wd 0.05 for 100 epochs. Our default schedules are short
# (CPU), so a higher lr; the frozen trunk before M is cached by the loop, so 30 epochs cost little.
# The lr of each: the one that won on val across the fair basis's tasks (bench/recipe_lr.py).
_RECIPE = {"lr": 1e-2, "epochs": 30, "weight_decay": 0.05}


def _space(depth: int) -> dict[str, str]:
    """Sweep M (a third, half, two thirds of the depth) and d' (rank), + the lr around the recipe's
    (registry.LR_MULTIPLES). DTL has no dropout or mask rate (neither the paper nor the authors'
    scripts): its regulariser is the CSN's low rank and M, both searched here."""
    return {"m": f"choice({depth // 3},{depth // 2},{2 * depth // 3})", "rank": "choice(1,2,4)"}


register_method(MethodSpec("dtl", DtlModel, DtlConfig, runtime="shared_trunk", mergeable=False, recipe=_RECIPE, search_space=_space,
                           description="DTL: low-rank compact side network added back from block M on"))
register_method(MethodSpec("dtl_plus", DtlPlusModel, DtlPlusConfig, runtime="shared_trunk", mergeable=False,
                           recipe={**_RECIPE, "lr": 3e-2}, search_space=_space,
                           description="DTL+: DTL with a shared depthwise conv over the patch grid"))
