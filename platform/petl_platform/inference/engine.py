"""The mixed-task inference engine (plain torch, no Ray): one batch of rows, each an image with its
own task and knobs, answered in one pass over the frozen weights, whatever method each task uses.

A task's runtime comes from its ``MethodSpec`` (``methods/registry.py``); one executor each:

- ``shared_trunk`` (linear, DTL/DTL+): the frozen trunk runs ONCE over the batch's distinct images,
  up to the deepest prefix any of these tasks needs; each task's ``forward_tail`` reads its rows.
- ``per_row_adapter`` and ``early_exit`` (LoRA, Adapter, RepAdapter, ARC, Dyn-* over them): one
  *mixed* ViT over the frozen tensors, whose adapted modules are ``RowSite``s. Rows are sorted by
  task, so each task owns a contiguous segment; at a site the frozen op runs once for the whole
  batch and each segment adds its own task's delta (``AdapterModule.input_delta/output_delta``: the
  S-LoRA / Punica segment idea applied to ViT blocks). After every block where a task has an exit,
  its rows whose confidence reaches their own threshold leave the batch; the rows still running
  continue together, across tasks. A batch whose rows all belong to one mergeable task runs its
  merged weights instead (a small LRU keeps the merged copies).
- ``token_dispatch`` (DyT): the active tokens of every task through one frozen MLP call per layer
  (the method's ``infer_many``).

Every row gets its logits (fp32, on the CPU), its exit stage and the compute it really spent.
Results equal each task run alone (tested within 1e-5 in fp32). The engine runs where the backbone's
weights are (CUDA when the replica has a GPU); ``dtype`` casts the frozen weights and the adapters
(bf16 / fp16 inference), and images are copied to the device from pinned memory without blocking.
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..data.transforms import Pixels
from ..errors import PetlError, unknown
from ..methods.base import PetlModel, replace_module, run_trunk, share_frozen
from ..methods.registry import spec_of


# A task gets merged weights after this many single-task batches: merging costs a few folds, so
# a task that only now and then has a batch to itself keeps the mixed path.
MERGE_AFTER = 2


@dataclass(frozen=True)
class Row:
    """One question: image ``image`` (an index into the batch's images) for ``task``, with its own
    knobs (``thresholds`` for early-exit tasks, ``ratio`` for token-dispatch tasks)."""

    image: int
    task: str
    knobs: Mapping = field(default_factory=dict)


@dataclass
class RowResult:
    task: str
    logits: torch.Tensor  # fp32, CPU
    exit_stage: int | None  # 1-based, early-exit tasks only
    compute: dict  # gflops really spent on this row, and what the runtime reports


@dataclass
class TaskInfo:
    """What the engine keeps per task model (found once, when the model is first seen)."""

    runtime: str
    gflops: float  # measured FLOPs of one full forward, per image
    sites: dict  # name -> AdapterModule (per-row adapter runtimes)
    exits: dict  # blocks run -> exit index (per-row adapter runtimes)
    costs: list  # FLOPs fraction per exit
    solo: int = 0  # batches in which this task had every per-row adapter row


class RowSite(nn.Module):
    """A frozen module of the mixed ViT where some tasks add a delta: the frozen op runs once on
    the whole batch; each run of consecutive segments whose modules share a class gets its deltas
    from that class's ``batched_input_delta`` / ``add_batched_output_delta`` (one gathered ``bmm``
    per weight where the method has one)."""

    def __init__(self, name: str, frozen: nn.Module, segments: dict):
        super().__init__()
        self.name, self.frozen = name, frozen
        self.segments = segments  # the engine's {site: [(start, end, class, modules, lengths)]} of this pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs = self.segments.get(self.name)
        if not runs:
            return self.frozen(x)
        inp = x
        for a, b, cls, mods, lengths in runs:
            d = cls.batched_input_delta(mods, x[a:b], lengths)
            if d is not None:
                if inp is x:
                    inp = x.clone()
                inp[a:b] += d
        out = self.frozen(inp)
        for a, b, cls, mods, lengths in runs:
            cls.add_batched_output_delta(out[a:b], mods, x[a:b], lengths)
        return out


def measured_gflops(model: nn.Module, image_size, device, dtype) -> float:
    """FLOPs of one image through ``model(x)``, as executed."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, *image_size, device=device, dtype=dtype))
    return counter.get_total_flops() / 1e9


class Engine:
    """Mixed-task batches over one frozen backbone; see the module docstring.

    ``run(images, rows, models)``: ``images`` ``[N, 3, H, W]`` (model inputs, or ``uint8`` pixels at
    the model's size, normalized by the backbone's transform on the engine's device), ``rows`` a list of ``Row``,
    ``models`` maps every task named in ``rows`` to its ``PetlModel`` (built on ``backbone``).
    ``last_stats`` holds what the last call ran.
    """

    def __init__(self, backbone: nn.Module, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, merge_cache: int = 2):
        self.fingerprint = getattr(backbone, "fingerprint", None)
        if self.fingerprint is None:
            raise PetlError("the engine's backbone has no fingerprint; create it with create_backbone()")
        if device is not None or dtype is not None:
            backbone.to(device=device, dtype=dtype)  # in place: task models share these tensors
        self.backbone = backbone.eval()
        ref = next(backbone.parameters())
        self.device, self.dtype = ref.device, ref.dtype
        self.image_size = tuple(backbone.patch_embed.img_size)
        self._info: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._segments: dict = {}
        self._sites: dict[str, tuple[str, ...]] = {}  # site -> absorbed siblings, in the mixed ViT
        self._mixed = None
        self._merged: OrderedDict = OrderedDict()  # id(model) -> (weakref, merged model)
        self._measures: dict[str, tuple] = {}  # architecture -> (GFLOPs, exit costs): data-independent runtimes
        self.merge_cache = merge_cache
        self.last_stats: dict = {}
        self._pixels = None  # the backbone's normalization, for uint8 images

    # ------------------------------------------------------------------ task models
    def check(self, task: str, model) -> None:
        """Refuse a model that is not a ``PetlModel`` on this engine's backbone."""
        if not isinstance(model, PetlModel):
            raise PetlError(f"task {task!r}: expected a PetlModel, got {type(model).__name__}")
        if model.backbone_fingerprint != self.fingerprint:
            raise PetlError(f"task {task!r} was built on backbone {model.backbone_name!r} (fingerprint "
                            f"{model.backbone_fingerprint}), but this engine serves "
                            f"{getattr(self.backbone, 'petl_name', '?')!r} (fingerprint {self.fingerprint}); "
                            f"rebuild or reload the adapter on this backbone")
        if model.depth != len(self.backbone.blocks):
            raise PetlError(f"task {task!r}: depth {model.depth} does not fit a backbone of "
                            f"{len(self.backbone.blocks)} blocks")

    def info(self, task: str, model: PetlModel) -> TaskInfo:
        """The engine's record of ``model``: checked, moved to the engine's device and dtype, its
        runtime, FLOPs, adapter sites and exits found once."""
        info = self._info.get(model)
        if info is None:
            self.check(task, model)
            model.to(device=self.device, dtype=self.dtype).eval()
            spec = spec_of(model)
            per_row = spec.runtime in ("per_row_adapter", "early_exit")
            gflops, costs = self._measured(model, spec)
            info = TaskInfo(spec.runtime, gflops, model.adapter_sites() if per_row else {},
                            {b: i for i, b in enumerate(model.exit_blocks())} if per_row else {}, costs)
            self._info[model] = info
        return info

    def _measured(self, model: PetlModel, spec) -> tuple[float, list[float]]:
        """The model's measured full-forward FLOPs and the fraction of them spent at each exit.
        Where they do not depend on the input (every runtime but token dispatch, whose router
        decides), tasks of one architecture (method and the names and shapes of its own tensors)
        cost the same: measured once, not on every cold load."""
        per_row = spec.runtime in ("per_row_adapter", "early_exit")

        def measure():
            return (measured_gflops(model, self.image_size, self.device, self.dtype),
                    model.exit_costs() if per_row else [1.0])

        if spec.runtime == "token_dispatch":
            return measure()
        key = json.dumps([model.method, sorted((k, list(v.shape)) for k, v in model.trainable_state_dict().items())])
        if key not in self._measures:
            self._measures[key] = measure()
        return self._measures[key]

    # ------------------------------------------------------------------ one call
    def run(self, images: torch.Tensor, rows: Sequence[Row], models: Mapping[str, PetlModel]) -> list[RowResult]:
        if images.ndim != 4:
            raise PetlError(f"images must be a [N, 3, H, W] batch, got shape {tuple(images.shape)}")
        for r in rows:
            if r.task not in models:
                raise unknown("task", r.task, models)
            if not 0 <= r.image < len(images):
                raise PetlError(f"row for task {r.task!r} points at image {r.image}; the batch has {len(images)}")
        infos = {t: self.info(t, models[t]) for t in dict.fromkeys(r.task for r in rows)}
        for r in rows:
            allowed = spec_of(models[r.task]).knobs
            bad = sorted(set(r.knobs) - set(allowed))
            if bad:
                raise PetlError(f"task {r.task!r} ({models[r.task].method}) takes "
                                f"{'knobs ' + ', '.join(allowed) if allowed else 'no knobs'}; got {', '.join(bad)}")
        if self.device.type == "cuda" and images.device.type == "cpu":
            images = images.pin_memory()  # the copy below then overlaps with the host's work
        x = images.to(self.device, non_blocking=True)
        if x.dtype == torch.uint8:  # pixels (4x fewer bytes to move): normalized here, on the device
            if self._pixels is None:
                self._pixels = Pixels.of(self.backbone)
            x = self._pixels.normalize(x, self.dtype)
        x = x.to(self.dtype)
        by_runtime: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(rows):
            rt = infos[r.task].runtime
            by_runtime["blockwise" if rt in ("per_row_adapter", "early_exit") else rt].append(i)
        out: list[RowResult | None] = [None] * len(rows)
        self.last_stats = {"rows": len(rows), "images": len(images), "embeds": 0, "trunk_blocks": 0,
                           "row_blocks": 0, "runtimes": {k: len(v) for k, v in by_runtime.items()}}
        with torch.inference_mode():
            emb = None
            if by_runtime["shared_trunk"] or by_runtime["blockwise"]:
                used = sorted({rows[i].image for k in ("shared_trunk", "blockwise") for i in by_runtime[k]})
                emb = (used, run_trunk(self.backbone, x[used], 0)[0])  # the frozen embedding, once per image
                self.last_stats["embeds"] = len(used)
            if by_runtime["shared_trunk"]:
                self._shared_trunk(emb, rows, by_runtime["shared_trunk"], models, infos, out)
            if by_runtime["blockwise"]:
                self._blockwise(emb, rows, by_runtime["blockwise"], models, infos, out)
            if by_runtime["token_dispatch"]:
                self._token_dispatch(x, rows, by_runtime["token_dispatch"], models, infos, out)
        return out

    # ------------------------------------------------------------------ shared trunk
    def _shared_trunk(self, emb, rows, idx, models, infos, out) -> None:
        used, z0 = emb
        pos = {img: j for j, img in enumerate(used)}
        groups = _group(rows, idx)
        depth = max(models[t].shared_prefix_blocks for t in groups)
        states = [z0]
        for blk in self.backbone.blocks[:depth]:  # once for every sharing task of the batch
            states.append(blk(states[-1]))
        self.last_stats["trunk_blocks"] = depth
        for t, members in groups.items():
            model, k = models[t], models[t].shared_prefix_blocks
            sel = torch.tensor([pos[rows[i].image] for i in members], device=z0.device)
            logits = model.forward_tail([s.index_select(0, sel) for s in states[:k + 1]]).float().cpu()
            compute = {"gflops": infos[t].gflops, "shared_trunk_blocks": k, "batch_trunk_blocks": depth}
            for j, i in enumerate(members):
                out[i] = RowResult(t, logits[j], None, compute)

    # ------------------------------------------------------------------ per-row adapters + early exit
    def _mixed_vit(self, infos) -> nn.Module:
        need = {}
        for info in infos:
            for name, m in info.sites.items():
                if need.setdefault(name, m.absorbs) != m.absorbs:
                    raise PetlError(f"adapter site {name}: tasks disagree on the modules it absorbs "
                                    f"({need[name]} vs {m.absorbs})")
        if self._mixed is None or not need.items() <= self._sites.items():
            self._sites = {**self._sites, **need}
            self._mixed = self._build_mixed(self._sites)
        return self._mixed

    def _build_mixed(self, sites: dict[str, tuple[str, ...]]) -> nn.Module:
        vit = share_frozen(self.backbone)  # a new module tree over the same frozen tensors
        for name in sorted(sites, key=lambda n: -n.count(".")):  # nested sites first
            parent = name.rpartition(".")[0]
            absorbed = []
            for sib in sites[name]:
                sib_name = f"{parent}.{sib}" if parent else sib
                if sib_name in sites:
                    raise PetlError(f"adapter site {name} absorbs {sib_name}, which is a site itself")
                absorbed.append(vit.get_submodule(sib_name))
                replace_module(vit, sib_name, nn.Identity())
            frozen = vit.get_submodule(name)
            replace_module(vit, name, RowSite(name, nn.Sequential(*absorbed, frozen) if absorbed else frozen,
                                              self._segments))
        return vit.eval()

    def merged(self, model: PetlModel) -> PetlModel:
        """The merged form of a mergeable task (LRU-cached, ``merge_cache`` entries)."""
        key = id(model)
        hit = self._merged.get(key)
        if hit is not None and hit[0]() is model:
            self._merged.move_to_end(key)
            return hit[1]
        merged = model.merged().to(device=self.device, dtype=self.dtype).eval()
        self._merged[key] = (weakref.ref(model), merged)
        while len(self._merged) > self.merge_cache:
            self._merged.popitem(last=False)
        return merged

    def _blockwise(self, emb, rows, idx, models, infos, out) -> None:
        used, z0 = emb
        pos = {img: j for j, img in enumerate(used)}
        # each task a contiguous segment, tasks of one method side by side (one gathered run per site)
        order = sorted(idx, key=lambda i: (models[rows[i].task].method, rows[i].task))
        tasks = [rows[i].task for i in order]
        only = tasks[0] if tasks[0] == tasks[-1] else None
        runner = {t: models[t] for t in dict.fromkeys(tasks)}
        if only is not None:
            infos[only].solo += 1
        if only is not None and self.merge_cache > 0 and infos[only].solo > MERGE_AFTER and spec_of(models[only]).mergeable:
            runner[only] = self.merged(models[only])
            blocks, sites = runner[only].vit.blocks, {}
        else:
            blocks = self._mixed_vit([infos[t] for t in runner]).blocks
            sites = {t: infos[t].sites for t in runner}
        thresholds = {}  # row -> its early-exit thresholds
        for i in order:
            model = models[rows[i].task]
            thr = rows[i].knobs.get("thresholds")
            thresholds[i] = model.exit_thresholds_for(thr).tolist() if infos[rows[i].task].runtime == "early_exit" else []
        h = z0.index_select(0, torch.tensor([pos[rows[i].image] for i in order], device=z0.device))
        alive = list(order)
        segs = None  # {task: (start, end)} of the rows still running, redone when rows leave
        for b, blk in enumerate(blocks, 1):
            if segs is None:
                segs = _segments(alive, rows)
                self._set_segments(segs, sites)
            h = blk(h)
            self.last_stats["row_blocks"] += len(alive)
            keep = torch.ones(len(alive), dtype=torch.bool)
            for t, (a, e) in segs.items():
                stage = infos[t].exits.get(b)
                if stage is None:
                    continue
                logits = runner[t].exit_logits(h[a:e], stage).float()
                last = stage == len(infos[t].exits) - 1
                if last:
                    leave = torch.ones(e - a, dtype=torch.bool)
                else:
                    thr = torch.tensor([thresholds[i][stage] for i in alive[a:e]])
                    leave = logits.softmax(-1).amax(-1).cpu() >= thr
                if not leave.any():
                    continue
                logits = logits.cpu()
                for j in leave.nonzero().flatten().tolist():
                    out[alive[a + j]] = self._exit_result(t, logits[j], stage, infos[t])
                keep[a:e] &= ~leave
            if not keep.all():
                h = h[keep.to(h.device)]
                alive = [i for i, k in zip(alive, keep.tolist()) if k]
                segs = None
            if not alive:
                break
        self._segments.clear()

    def _set_segments(self, segs: dict, sites: dict) -> None:
        """Per site, runs of adjacent task segments whose modules share a class."""
        self._segments.clear()
        for t, (a, e) in segs.items():
            for name, m in sites.get(t, {}).items():
                runs = self._segments.setdefault(name, [])
                last = runs[-1] if runs else None
                if last is not None and last[1] == a and last[2] is type(m):
                    last[3].append(m)
                    last[4].append(e - a)
                    runs[-1] = (last[0], e, *last[2:])
                else:
                    runs.append((a, e, type(m), [m], [e - a]))

    @staticmethod
    def _exit_result(task: str, logits: torch.Tensor, stage: int, info: TaskInfo) -> RowResult:
        if info.runtime != "early_exit":
            return RowResult(task, logits, None, {"gflops": info.gflops, "flops_fraction": 1.0})
        cost = info.costs[stage]
        return RowResult(task, logits, stage + 1, {"gflops": info.gflops * cost, "flops_fraction": cost,
                                                    "stages": len(info.costs)})

    # ------------------------------------------------------------------ token dispatch
    def _token_dispatch(self, x, rows, idx, models, infos, out) -> None:
        groups: dict[tuple, list[int]] = defaultdict(list)  # (task, ratio) -> rows
        for i in idx:
            groups[(rows[i].task, rows[i].knobs.get("ratio"))].append(i)
        keys = list(groups)
        chosen = [models[t] for t, _ in keys]
        xs = [x[torch.tensor([rows[i].image for i in groups[k]], device=x.device)] for k in keys]
        answers = type(chosen[0]).infer_many(chosen, xs, [r for _, r in keys])
        for (t, _), (logits, stats) in zip(keys, answers):
            members = groups[(t, _)]
            logits = logits.float().cpu()
            compute = {"gflops": 2 * stats["flops"] / len(members) / 1e9,  # multiply-accumulates -> FLOPs
                       "flops_fraction": stats["flops_ratio"], "activation_rate": stats["activation_rate"]}
            for j, i in enumerate(members):
                out[i] = RowResult(t, logits[j], None, compute)


def _group(rows, idx) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i in idx:
        groups[rows[i].task].append(i)
    return groups


def _segments(alive: list[int], rows) -> dict[str, tuple[int, int]]:
    """``{task: (start, end)}`` of the task-sorted rows still running."""
    segs: dict[str, tuple[int, int]] = {}
    for pos, i in enumerate(alive):
        t = rows[i].task
        a = segs[t][0] if t in segs else pos
        segs[t] = (a, pos + 1)
    return segs
