"""Shared-trunk multi-task inference (plain torch, no Ray).

Many task models sit on one frozen backbone. A method whose first ``k`` blocks compute exactly
the frozen backbone (``PetlModel.shared_prefix_blocks = k``: linear probe ``k = depth``, DTL
``k = M``) only needs the trunk states ``z_0..z_k``, which are identical for every such task. So
for one batch and a set of tasks, ``MultiTaskPredictor`` runs the frozen trunk ONCE up to the
deepest prefix any requested task needs, hands each task ``states[:k_t + 1]`` for its
``forward_tail``, and runs tasks with no shared prefix (LoRA, Adapter, RepAdapter, ARC, ...)
through their own full forward in the same call. Results equal each task run alone: the trunk
executes the same ops on the same tensors.

The only contract a method has to honour is the ``PetlModel`` hooks (``shared_prefix_blocks``,
``forward_tail``); DyT / Dyn-* models plug in unchanged. Compute is reported per call as block
counts of the nominal path (a data-dependent method, e.g. an early exit, may run fewer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import PetlError, unknown
from ..methods.base import PetlModel, run_trunk


@dataclass(frozen=True)
class TrunkPlan:
    """What one call computes: trunk depth, and per task its prefix ``k`` (0 = own forward)."""

    tasks: tuple[str, ...]
    prefix: dict[str, int]
    trunk_blocks: int

    @property
    def sharing(self) -> tuple[str, ...]:
        return tuple(t for t in self.tasks if self.prefix[t] > 0)


@dataclass
class CallStats:
    """Compute of one ``predict`` call, in transformer blocks (x batch size for block-images)."""

    tasks: list[str]
    batch: int
    trunk_blocks: int  # frozen blocks run once for all sharing tasks
    tail_blocks: dict[str, int]  # blocks each task ran itself (its tail, or its whole depth)
    blocks_run: int  # trunk_blocks + sum(tail_blocks)
    blocks_independent: int  # what one forward per task would have run: sum of depths
    embeds_run: int  # patch-embedding passes actually run
    embeds_independent: int
    extra: dict = field(default_factory=dict)

    @property
    def blocks_saved(self) -> int:
        return self.blocks_independent - self.blocks_run

    @property
    def block_ratio(self) -> float:
        """Independent / shared block count (>= 1; the compute speed-up if blocks dominate)."""
        return self.blocks_independent / max(1, self.blocks_run)

    def to_dict(self) -> dict:
        return {**asdict(self), "blocks_saved": self.blocks_saved, "block_ratio": self.block_ratio}


class MultiTaskPredictor:
    """Answer several tasks for one batch with the frozen trunk computed once.

    ``models`` maps task name -> ``PetlModel``; every model must sit on ``backbone`` (same
    fingerprint). Models and backbone are put in eval mode. ``predict`` returns
    ``{task: logits}``; ``last_stats`` / ``totals`` record the compute.
    """

    def __init__(self, backbone: nn.Module, models: dict[str, PetlModel] | None = None):
        self.backbone = backbone.eval()
        self.fingerprint = getattr(backbone, "fingerprint", None)
        if self.fingerprint is None:
            raise PetlError("the predictor's backbone has no fingerprint; create it with create_backbone()")
        self.models: dict[str, PetlModel] = {}
        self.last_stats: CallStats | None = None
        self.totals = {"calls": 0, "blocks_run": 0, "blocks_independent": 0}
        for name, model in (models or {}).items():
            self.add(name, model)

    # ------------------------------------------------------------------ task set
    def add(self, task: str, model: PetlModel) -> None:
        """Register (or replace) ``task``; refuses a model trained on another backbone."""
        if not isinstance(model, PetlModel):
            raise PetlError(f"task {task!r}: expected a PetlModel, got {type(model).__name__}")
        if model.backbone_fingerprint != self.fingerprint:
            raise PetlError(f"task {task!r} was built on backbone {model.backbone_name!r} (fingerprint "
                            f"{model.backbone_fingerprint}), but this predictor serves "
                            f"{getattr(self.backbone, 'petl_name', '?')!r} (fingerprint {self.fingerprint}); "
                            f"rebuild or reload the adapter on this backbone")
        k = model.shared_prefix_blocks
        if not 0 <= k <= model.depth or model.depth != len(self.backbone.blocks):
            raise PetlError(f"task {task!r}: shared_prefix_blocks={k} / depth={model.depth} do not fit a "
                            f"backbone of {len(self.backbone.blocks)} blocks")
        self.models[task] = model.eval()

    def remove(self, task: str) -> None:
        self._check([task])
        del self.models[task]

    @property
    def tasks(self) -> list[str]:
        return sorted(self.models)

    def _check(self, tasks) -> list[str]:
        if isinstance(tasks, str):
            tasks = [tasks]
        for t in tasks:
            if t not in self.models:
                raise unknown("task", t, self.models)
        return list(dict.fromkeys(tasks))  # dedupe, keep order

    # ------------------------------------------------------------------ planning and running
    def plan(self, tasks: list[str] | None = None) -> TrunkPlan:
        tasks = self._check(self.tasks if tasks is None else tasks)
        if not tasks:
            raise PetlError(f"no task requested; valid tasks: {', '.join(self.tasks)}")
        prefix = {t: self.models[t].shared_prefix_blocks for t in tasks}
        return TrunkPlan(tuple(tasks), prefix, max(prefix.values()))

    def run(self, x: torch.Tensor, tasks: list[str] | None = None,
            knobs: dict[str, dict] | None = None) -> tuple[dict[str, torch.Tensor], CallStats]:
        """``({task: logits}, stats)`` for batch ``x``. ``knobs`` maps a task to its per-call compute
        knobs (``{"thresholds": [...]}`` for Dyn-*, ``{"ratio": 0.3}`` for DyT): each dynamic task runs
        with its own dynamics, and what it spent is in ``stats.extra[task]``."""
        plan = self.plan(tasks)
        knobs = knobs or {}
        for t in knobs:
            if t not in plan.tasks:
                raise PetlError(f"knobs given for task {t!r}, which is not requested")
            if plan.prefix[t] > 0 and knobs[t]:
                raise PetlError(f"task {t!r} ({self.models[t].method}) shares the trunk and takes no compute knobs")
        out: dict[str, torch.Tensor] = {}
        tails: dict[str, int] = {}
        extra: dict[str, dict] = {}
        with torch.inference_mode():
            states = run_trunk(self.backbone, x, plan.trunk_blocks) if plan.sharing else None
            for t in plan.tasks:
                model, k = self.models[t], plan.prefix[t]
                if k > 0:
                    out[t] = model.forward_tail(states[:k + 1])
                else:
                    out[t], info = model.infer(x, **knobs.get(t, {}))
                    if info:
                        extra[t] = info
                tails[t] = model.depth - k
        depth_sum = sum(self.models[t].depth for t in plan.tasks)
        own = sum(1 for t in plan.tasks if plan.prefix[t] == 0)
        trunk = plan.trunk_blocks if plan.sharing else 0
        stats = CallStats(tasks=list(plan.tasks), batch=int(x.shape[0]), trunk_blocks=trunk, tail_blocks=tails,
                          blocks_run=trunk + sum(tails.values()), blocks_independent=depth_sum,
                          embeds_run=own + (1 if plan.sharing else 0), embeds_independent=len(plan.tasks),
                          extra=extra)
        return out, stats

    def predict(self, x: torch.Tensor, tasks: list[str] | None = None,
                knobs: dict[str, dict] | None = None) -> dict[str, torch.Tensor]:
        """``{task: logits}`` for ``tasks`` (default: all); records ``last_stats`` and ``totals``."""
        out, stats = self.run(x, tasks, knobs)
        self.last_stats = stats
        self.totals["calls"] += 1
        self.totals["blocks_run"] += stats.blocks_run
        self.totals["blocks_independent"] += stats.blocks_independent
        return out

    __call__ = predict
