"""Linear probe: the frozen backbone's pooled features and a trainable linear head."""

from dataclasses import dataclass

from ..base import PetlModel
from ..config import MethodConfig
from ..registry import MethodSpec, register_method


@dataclass(frozen=True)
class LinearConfig(MethodConfig):
    """The linear probe has no hyperparameters besides the training recipe."""


class LinearProbe(PetlModel):
    @property
    def shared_prefix_blocks(self) -> int:
        return self.depth  # the whole trunk is the frozen backbone

    def merged(self):
        return self  # nothing to fold: it already is the plain frozen model + head


# The probe trains on cached trunk features (the loop computes the frozen trunk once), so many
# epochs at a high learning rate cost seconds. Its default space is the lr alone (recipe x 1/9 to
# x 9, ``registry.LR_MULTIPLES``): it has no rate to search.
register_method(MethodSpec("linear", LinearProbe, LinearConfig, runtime="shared_trunk", mergeable=True,
                           # the recipe lr won on val across the fair basis (bench/recipe_lr.py)
                           description="linear probe: head only", recipe={"epochs": 40, "lr": 9e-2}))
