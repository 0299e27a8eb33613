"""Multi-task prediction for one batch of images: every requested task answers every image.

``MultiTaskPredictor`` keeps a set of task models on one frozen backbone and hands each call to the
mixed-task ``Engine`` (``engine.py``) as rows ``(image, task, knobs)``: the frozen embedding runs
once per image, the trunk once for every task that shares it (linear probe, DTL), the frozen ops of
per-row adapter tasks (LoRA, Adapter, RepAdapter, ARC, Dyn-*) once for all their rows, DyT's
active tokens through one MLP call per layer. Results equal each task run alone.

``CallStats`` reports the nominal block counts of a call (shared trunk once + each task's own
blocks) next to one forward per task; data-dependent methods (early exit) may run fewer, and what
they spent is in ``extra``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..errors import PetlError, unknown
from ..methods.base import PetlModel
from ..methods.registry import spec_of
from .engine import Engine, Row


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

    def __init__(self, backbone: nn.Module, models: dict[str, PetlModel] | None = None,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.engine = Engine(backbone, device=device, dtype=dtype)
        self.backbone, self.fingerprint = self.engine.backbone, self.engine.fingerprint
        self.models: dict[str, PetlModel] = {}
        self.last_stats: CallStats | None = None
        self.totals = {"calls": 0, "blocks_run": 0, "blocks_independent": 0}
        for name, model in (models or {}).items():
            self.add(name, model)

    # ------------------------------------------------------------------ task set
    def add(self, task: str, model: PetlModel) -> None:
        """Register (or replace) ``task``; refuses a model trained on another backbone."""
        self.engine.check(task, model)
        k = model.shared_prefix_blocks
        if not 0 <= k <= model.depth:
            raise PetlError(f"task {task!r}: shared_prefix_blocks={k} does not fit its depth {model.depth}")
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
        n = int(x.shape[0])
        rows = [Row(i, t, knobs.get(t) or {}) for t in plan.tasks for i in range(n)]
        results = self.engine.run(x, rows, self.models)
        out: dict[str, torch.Tensor] = {}
        extra: dict[str, dict] = {}
        for j, t in enumerate(plan.tasks):
            got = results[j * n:(j + 1) * n]
            out[t] = torch.stack([r.logits for r in got])
            runtime = spec_of(self.models[t]).runtime
            if runtime == "early_exit":
                full = self.engine.info(t, self.models[t]).gflops
                extra[t] = {"exit_stage": [r.exit_stage for r in got],
                            "flops": int(sum(r.compute["gflops"] for r in got) * 1e9), "full_flops": int(full * n * 1e9)}
            elif runtime == "token_dispatch":
                extra[t] = {k: got[0].compute[k] for k in ("activation_rate", "flops_fraction")}
        tails = {t: self.models[t].depth - plan.prefix[t] for t in plan.tasks}
        trunk = plan.trunk_blocks if plan.sharing else 0
        stats = CallStats(tasks=list(plan.tasks), batch=n, trunk_blocks=trunk, tail_blocks=tails,
                          blocks_run=trunk + sum(tails.values()),
                          blocks_independent=sum(self.models[t].depth for t in plan.tasks),
                          embeds_run=1 if self.engine.last_stats["embeds"] else 0, embeds_independent=len(plan.tasks),
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
