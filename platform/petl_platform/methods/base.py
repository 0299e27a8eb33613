"""``PetlModel``: a frozen timm ViT (tensors shared, never copied) + a method's modules + a head.

Every method subclasses ``PetlModel`` and overrides only what it changes:

- ``inject()`` adds the trainable modules (use ``find_modules`` with anchored patterns);
- ``forward_blocks(x)`` for methods that change how blocks are chained (DTL's side network);
- ``shared_prefix_blocks`` / ``forward_tail(states)`` for methods whose first blocks are the
  untouched frozen backbone, so many tasks can share one trunk pass;
- ``training_step(x, y, progress)`` / ``after_backward()`` for methods with auxiliary losses or
  gradient surgery, so one generic loop trains every method;
- ``merged()`` for methods that fold into the frozen weights.
"""

from __future__ import annotations

import itertools
import logging
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import fingerprint
from ..errors import PetlError
from .config import MethodConfig

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    loss: torch.Tensor
    logits: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class AdapterModule(nn.Module):
    """Base of every injected trainable module. ``branch_dropout`` acts on the module's added
    branch only (identity in eval, so merges stay exact); Dyn-Adapter's bidirectional
    sparsification sets its rate per block (p_shallow / p_deep).

    The mixed-task contract (what lets the engine run the frozen op once for rows of many tasks):
    in eval mode a module at name ``site`` of the ViT computes

        forward(x) == frozen_forward(x + input_delta(x)) + output_delta(x)

    where ``frozen_forward`` is the frozen module(s) it wraps, row-independent; either delta may be
    ``None``. ``absorbs`` names siblings of ``site`` that the module runs itself before the wrapped
    module (their place in the block becomes ``Identity``): Adapter absorbs ``norm2`` to see X'.
    """

    absorbs: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.branch_dropout = nn.Dropout(0.0)

    def frozen_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not declare its frozen computation")

    def input_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def output_delta(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    # Mixed batches (eval only): consecutive row segments of ``x``, segment ``i`` has ``lengths[i]``
    # rows and module ``mods[i]``. These loops are the reference; a method may override them with
    # one gathered ``bmm`` per weight (the Punica / S-LoRA idea), which pays off with many tasks.
    @classmethod
    def batched_input_delta(cls, mods: list[AdapterModule], x: torch.Tensor, lengths: list[int]):
        """Every segment's ``input_delta``, concatenated; ``None`` when no module has one."""
        parts, a = [], 0
        for m, n in zip(mods, lengths):
            parts.append(m.input_delta(x[a:a + n]))
            a += n
        if all(p is None for p in parts):
            return None
        ref = next(p for p in parts if p is not None)
        return torch.cat([p if p is not None else ref.new_zeros((n, *ref.shape[1:])) for p, n in zip(parts, lengths)])

    @classmethod
    def add_batched_output_delta(cls, out: torch.Tensor, mods: list[AdapterModule], x: torch.Tensor,
                                 lengths: list[int]) -> None:
        """Add every segment's ``output_delta`` to its rows of ``out`` (the frozen op's output), in place."""
        a = 0
        for m, n in zip(mods, lengths):
            d = m.output_delta(x[a:a + n])
            if d is not None:
                out[a:a + n] += d
            a += n

    # Banks (``MethodSpec.bank``, ``inference/banks.py``): tasks as slots of stacked tensors. A module
    # class that supports them returns its tensors by kernel argument in ``bank_tensors`` (its own
    # parameters, or ones it shares with the model, like ARC's down-projection) and what tasks of
    # one bank must share in ``bank_static``; its kernels get ``mod`` (the bank's template module,
    # for static values and frozen sub-modules), the rows ``x`` and ``w``: each argument's weights
    # gathered per row (``[rows, ...]``) or one task's (``[1, ...]``, broadcast over the rows).
    def bank_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} declares no bank layout")

    def bank_static(self) -> tuple:
        return ()

    @classmethod
    def bank_input_delta(cls, mod: AdapterModule, x: torch.Tensor, w: dict) -> torch.Tensor | None:
        return None

    @classmethod
    def bank_output_delta(cls, mod: AdapterModule, out: torch.Tensor, x: torch.Tensor, w: dict) -> None:
        """Add every row's delta to its rows of ``out`` in place."""


def row_index(lengths: list[int], device) -> torch.Tensor:
    """``[0, 0, 1, 2, 2, 2, ...]``: the segment of each row, for gathering per-row weights."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=device),
                                   torch.tensor(lengths, device=device))


def adapter_modules(root: nn.Module, block: int) -> list[AdapterModule]:
    """The ``AdapterModule``s injected into ``root.blocks[block]``."""
    return [m for m in root.blocks[block].modules() if isinstance(m, AdapterModule)]


def frozen_tensors(module: nn.Module):
    return itertools.chain(module.parameters(), module.buffers())


def share_frozen(backbone: nn.Module) -> nn.Module:
    """A new module tree over the *same* frozen tensors: injecting into it never touches
    ``backbone`` and costs no weight memory, so many task models can sit on one backbone.

    Every module object is new, and so is each of its list, dict and set attributes (the parameter,
    buffer, child and hook tables among them); every tensor is shared. About 10x faster than a
    ``deepcopy`` with the tensors memoised, which a replica pays on every cold task load."""
    def clone(m: nn.Module) -> nn.Module:
        new = m.__class__.__new__(m.__class__)
        state = {k: (v.copy() if isinstance(v, (list, dict, set)) else v) for k, v in m.__dict__.items()}
        state["_modules"] = {k: None if c is None else clone(c) for k, c in m._modules.items()}
        new.__dict__.update(state)
        return new

    return clone(backbone)


def find_modules(root: nn.Module, pattern: str, kind: type | None = None) -> list[tuple[str, nn.Module]]:
    """Modules whose full name matches the anchored regex ``pattern`` (e.g. ``blocks\\.\\d+\\.attn\\.qkv``).

    Fails when nothing matches, logs what did, so a wrong pattern never trains nothing silently.
    """
    rx = re.compile(pattern)
    hits = [(n, m) for n, m in root.named_modules() if rx.fullmatch(n) and (kind is None or isinstance(m, kind))]
    if not hits:
        raise PetlError(f"target pattern {pattern!r} matched no module of the backbone")
    log.debug("pattern %s matched %d modules: %s", pattern, len(hits), [n for n, _ in hits][:4])
    return hits


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def run_trunk(vit: nn.Module, x: torch.Tensor, upto: int) -> list[torch.Tensor]:
    """Embed ``x`` and run the first ``upto`` frozen blocks; returns the ``upto + 1`` block inputs
    ``[z_0 (embedding), z_1, ..., z_upto]``."""
    x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
    states = [x]
    for blk in vit.blocks[:upto]:
        states.append(blk(states[-1]))
    return states


class PetlModel(nn.Module):
    """Base PETL model; on its own it is the linear probe (everything frozen but the head)."""

    def __init__(self, backbone: nn.Module, num_classes: int, config: MethodConfig, method: str):
        super().__init__()
        self.method = method
        self.config = config
        self.num_classes = num_classes
        self.backbone_name = getattr(backbone, "petl_name", type(backbone).__name__)
        self.backbone_fingerprint = getattr(backbone, "fingerprint", None) or fingerprint(backbone)
        backbone.requires_grad_(False)
        self.vit = share_frozen(backbone)
        self._frozen_ptrs = frozenset(t.data_ptr() for t in frozen_tensors(backbone))
        self.head = nn.Linear(self.vit.num_features, num_classes)
        self.inject()

    # ----------------------------------------------------------------- method hooks
    def inject(self) -> None:
        """Add the method's trainable modules to ``self.vit``. The linear probe adds none."""

    @property
    def depth(self) -> int:
        return len(self.vit.blocks)

    @property
    def shared_prefix_blocks(self) -> int:
        """How many leading blocks compute exactly the frozen backbone (shareable across tasks)."""
        return 0

    def tail_inputs(self) -> list[int]:
        """Which trunk states ``forward_tail`` reads (the rest may be ``None``): the last by default."""
        return [self.shared_prefix_blocks]

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.vit.blocks:
            x = blk(x)
        return x

    def forward_tail(self, states: list[torch.Tensor]) -> torch.Tensor:
        """Logits from the trunk states ``[z_0 .. z_k]``, ``k = shared_prefix_blocks``."""
        x = states[-1]
        for blk in self.vit.blocks[len(states) - 1:]:
            x = blk(x)
        return self.forward_head(self.vit.norm(x))

    def training_step(self, x: torch.Tensor, y: torch.Tensor, progress: float) -> StepOutput:
        """Loss for one batch; ``progress`` in [0, 1] is the share of training done."""
        logits = self(x)
        return StepOutput(F.cross_entropy(logits, y), logits)

    def after_backward(self) -> None:
        """Called between ``backward()`` and ``optimizer.step()`` (gradient masks go here)."""

    def infer(self, x: torch.Tensor, **knobs) -> tuple[torch.Tensor, dict]:
        """Eval-mode logits plus what this call spent; dynamic methods take per-call compute
        knobs (Dyn-*: ``thresholds``; DyT: ``ratio``) and report exits / activation rates."""
        if knobs:
            raise PetlError(f"method {self.method!r} takes no inference knobs; got {', '.join(sorted(knobs))}")
        return self(x), {}

    def merged(self) -> nn.Module:
        raise PetlError(f"method {self.method!r} is not mergeable: its modules cannot be folded into the frozen weights")

    # ----------------------------------------------------------------- exits (the engine's view)
    def exit_blocks(self) -> list[int]:
        """After how many blocks each exit reads the tokens; the last is always ``depth``."""
        return [self.depth]

    def exit_logits(self, h: torch.Tensor, stage: int) -> torch.Tensor:
        """Logits of exit ``stage`` (0-based) from the tokens after block ``exit_blocks()[stage]``."""
        return self.forward_head(self.vit.norm(h))

    def exit_costs(self) -> list[float]:
        """Per-sample FLOPs fraction of ``model(x)`` spent when leaving at each exit."""
        return [1.0]

    def exit_head(self, stage: int) -> nn.Module:
        """The head of exit ``stage``: ``exit_logits(h, stage)`` is
        ``exit_head(stage)(vit.forward_head(vit.norm(h), pre_logits=True))``."""
        return self.head

    def exit_thresholds_for(self, thresholds=None) -> torch.Tensor:
        """Confidence thresholds of the early exits (none here; Dyn-* overrides)."""
        if thresholds is not None:
            raise PetlError(f"method {self.method!r} has no early exits; it takes no thresholds")
        return torch.empty(0)

    def adapter_sites(self) -> dict[str, AdapterModule]:
        """The outermost ``AdapterModule``s inside the ViT by name: where this task's rows differ
        from the frozen backbone in a mixed batch."""
        sites: dict[str, AdapterModule] = {}
        for name, m in self.vit.named_modules():
            if isinstance(m, AdapterModule) and not any(name.startswith(s + ".") for s in sites):
                sites[name] = m
        return sites

    # ----------------------------------------------------------------- forward
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return run_trunk(self.vit, x, 0)[0]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit.norm(self.forward_blocks(self.embed(x)))

    def forward_head(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head(self.vit.forward_head(feats, pre_logits=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def prefix_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return run_trunk(self.vit, x, self.shared_prefix_blocks)

    # ----------------------------------------------------------------- parameters and state
    def num_trainable(self) -> int:
        """Trainable parameters, task head excluded (the papers' convention)."""
        return sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and not n.startswith("head."))

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything that is not a frozen backbone tensor: method modules, buffers and the head."""
        return {k: v for k, v in self.state_dict().items() if v.data_ptr() not in self._frozen_ptrs}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str = "state") -> None:
        own = self.trainable_state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise PetlError(f"{source} does not fit method {self.method!r}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for k, v in state.items():
            if own[k].shape != v.shape:
                raise PetlError(f"{source}: tensor {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict(state, strict=False)
