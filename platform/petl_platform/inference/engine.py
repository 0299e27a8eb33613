"""The mixed-task inference engine (plain torch, no Ray): one batch of rows, each an image with its
own task and knobs, answered in one pass over the frozen weights, whatever method each task uses.

A task's runtime comes from its ``MethodSpec`` (``methods/registry.py``); one executor each:

- ``shared_trunk`` (linear, DTL/DTL+): the frozen trunk runs ONCE over the batch's distinct images,
  up to the deepest prefix any of these tasks needs; each task's ``forward_tail`` reads its rows.
- ``per_row_adapter`` and ``early_exit`` (LoRA, Adapter, RepAdapter, ARC, Dyn-* over them): one
  *mixed* ViT over the frozen tensors, whose adapted modules are ``RowSite``s. A task is a slot of
  its architecture's adapter bank (``banks.py``; a ``PetlModel`` passed in is copied into one when
  first seen). Rows are sorted by bank and slot; at a site the frozen op runs once for the whole
  batch and each bank's rows add their own task's delta with their weights gathered by slot (the
  BGMV idea of Punica / S-LoRA; ``gather="segments"`` runs one call per task on its slot instead).
  Heads and exit heads are gathered the same way. After every block where a task has an exit,
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
import threading
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
from ..methods.registry import get_method, spec_of
from .banks import Bank, BankedTask, NotBankable, run_head


# A task gets merged weights after this many single-task batches: merging costs a few folds, so
# a task that only now and then has a batch to itself keeps the mixed path.
MERGE_AFTER = 2
# the most bytes a bank on the host is preallocated for (address space, not memory: see banks.py)
PREALLOCATE_MAX = 2**30


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
    the whole batch. Banked tasks (``banks.py``): each run of rows of one bank gets its deltas from
    the module class's gathered kernel (``bank_input_delta`` / ``bank_output_delta``) with every
    row's weights gathered by slot. Other tasks: each run of consecutive segments whose modules
    share a class gets its deltas from ``batched_input_delta`` / ``add_batched_output_delta``."""

    def __init__(self, name: str, frozen: nn.Module, segments: dict, bank_runs: list):
        super().__init__()
        self.name, self.frozen = name, frozen
        self.segments = segments  # the engine's {site: [(start, end, class, modules, lengths)]} of this pass
        self.bank_runs = bank_runs  # the engine's [BankRun] of this pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        runs = self.segments.get(self.name)
        banked = [(r, r.bank.sites[self.name]) for r in self.bank_runs if self.name in r.bank.sites]
        if not runs and not banked:
            return self.frozen(x)
        inp = x
        weights = [(r, cls, mod, {arg: r.weights(key) for arg, key in args.items()}) for r, (cls, mod, args) in banked]
        for r, cls, mod, w in weights:
            d = cls.bank_input_delta(mod, x[r.start:r.end], w)
            if d is not None:
                if inp is x:
                    inp = x.clone()
                inp[r.start:r.end] += d
        for a, b, cls, mods, lengths in runs or ():
            d = cls.batched_input_delta(mods, x[a:b], lengths)
            if d is not None:
                if inp is x:
                    inp = x.clone()
                inp[a:b] += d
        out = self.frozen(inp)
        for r, cls, mod, w in weights:
            cls.bank_output_delta(mod, out[r.start:r.end], x[r.start:r.end], w)
        for a, b, cls, mods, lengths in runs or ():
            cls.add_batched_output_delta(out[a:b], mods, x[a:b], lengths)
        return out


@dataclass
class BankRun:
    """Rows ``start:end`` of the running batch, all of one bank: ``slots`` is their slot per row
    (``[rows]`` on the device) or one ``int`` when they are one task's (its slot, read as a view)."""

    start: int
    end: int
    bank: Bank
    slots: torch.Tensor | int
    classes: list[int]  # each row's task's class count (the bank's class dimension is the widest task's)
    shared: dict = field(default_factory=dict)  # gathered once per run: tensors several sites read

    def cut(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [rows, bank classes]`` with every row's padded classes at -inf."""
        if min(self.classes) == logits.shape[-1]:  # every row's task is as wide as the bank
            return logits
        n = torch.tensor(self.classes, device=logits.device)
        return logits.masked_fill(torch.arange(logits.shape[-1], device=logits.device) >= n[:, None], float("-inf"))

    def weights(self, key: str) -> torch.Tensor:
        t = self.bank.tensors[key]
        if isinstance(self.slots, int):
            return t[self.slots:self.slots + 1]
        if key in self.bank.shared:
            got = self.shared.get(key)
            if got is None:
                got = self.shared[key] = t.index_select(0, self.slots)
            return got
        return t.index_select(0, self.slots)


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
                 dtype: torch.dtype | None = None, merge_cache: int = 2, gather: str = "rows"):
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
        if gather not in ("rows", "segments"):
            raise PetlError(f"gather must be 'rows' or 'segments', got {gather!r}")
        # banked rows: "rows" gathers each row's weights by slot (one kernel call per bank and site);
        # "segments" runs each task's rows with its slot's view (one call per task and site)
        self.gather = gather
        # the adapter store's byte budget on this device (``Stack.store`` sets it): a bank on the host
        # is preallocated for that many bytes of its tasks at once (its free slots are never written,
        # so their pages cost no memory), so it never grows by reallocation and copy under budget
        self.bank_bytes: int | None = None
        self.banks: dict[str, Bank] = {}
        self._templates: dict[str, PetlModel] = {}
        self._adopted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # PetlModel -> (BankedTask, tensors, version)
        self._bank_runs: list[BankRun] = []
        self._bank_lock = threading.Lock()

    # ------------------------------------------------------------------ task models
    def check(self, task: str, model) -> None:
        """Refuse a model that is not a ``PetlModel`` (or a banked task) on this engine's backbone."""
        if not isinstance(model, (PetlModel, BankedTask)):
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
        if info is None and isinstance(model, BankedTask):
            self.check(task, model)
            spec = spec_of(model)
            bank = model.bank
            if bank.measured is None:  # once per bank: its tasks cost the same
                bank.measured = self._measured(bank.template, spec)
            gflops, costs = bank.measured
            info = TaskInfo(spec.runtime, gflops, {}, {b: i for i, b in enumerate(model.bank.exit_blocks)}, costs)
            self._info[model] = info
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

    # ------------------------------------------------------------------ banks
    def admit(self, method: str, hparams: dict, num_classes: int, state: Mapping[str, torch.Tensor],
              source: str = "state") -> BankedTask | None:
        """A task of ``method`` from its flat tensors, as a slot of its architecture's bank (no module
        is built but the bank's template, once per architecture); None when the method has no bank
        layout (the caller builds its model). A state that does not fit is refused (PetlError)."""
        spec = get_method(method)
        if spec.bank is None:
            return None
        template = self._template(method, dict(hparams), int(num_classes))
        try:
            bank = self._bank_for(template)
        except NotBankable:
            return None
        slot = bank.admit(state, int(num_classes), source)
        thr = state.get("exit_thresholds")
        return BankedTask(bank, slot, int(num_classes), template.config,
                          None if thr is None else thr.detach().float().cpu())

    def _template(self, method: str, hparams: dict, num_classes: int) -> PetlModel:
        from ..methods import build_model

        key = json.dumps([method, hparams, num_classes], sort_keys=True, default=str)
        with self._bank_lock:
            t = self._templates.get(key)
        if t is None:
            t = build_model(method, self.backbone, num_classes, **hparams).to(device=self.device, dtype=self.dtype).eval()
            with self._bank_lock:
                t = self._templates.setdefault(key, t)
        return t

    def _bank_for(self, template: PetlModel) -> Bank:
        key = template.__dict__.get("_bank_key")
        if key is None:
            key = template.__dict__["_bank_key"] = Bank.key_of(template)  # once per template, not per load
        with self._bank_lock:
            bank = self.banks.get(key)
            if bank is None:
                slots = 8
                if self.bank_bytes and self.device.type == "cpu":  # up to 1 GiB at once; past it, doubling
                    per = sum(v.numel() * v.element_size() for v in template.trainable_state_dict().values())
                    slots = max(slots, int(min(self.bank_bytes, PREALLOCATE_MAX) // max(1, per)) + 1)
                bank = self.banks[key] = Bank(key, template, self.backbone, slots)
            return bank

    def _banked(self, model) -> BankedTask | None:
        """The bank slot running ``model``: itself when banked, else (a ``PetlModel`` of a method with a
        bank layout) a copy of its tensors in a slot, made when first seen and again whenever its
        tensors changed in place (their version counters moved); None: no bank for it."""
        if isinstance(model, BankedTask):
            return model
        hit = self._adopted.get(model)
        if hit is not None and (hit[0] is None or sum(t._version for t in hit[1]) == hit[2]):
            return hit[0]
        if spec_of(model).bank is None or ":" in model.method:
            self._adopted[model] = (None, [], 0)
            return None
        try:
            template = self._template(model.method, model.config.to_dict(), model.num_classes)
            bank = self._bank_for(template)
        except NotBankable:
            self._adopted[model] = (None, [], 0)
            return None
        # the bank's keys select the task's tensors (a model built before the engine moved the
        # backbone to its dtype no longer tells its frozen tensors from its own by address)
        full = model.state_dict()
        state = {k: full[k] for k in bank.shapes if k in full}
        thr = state.get("exit_thresholds")
        bt = BankedTask(bank, bank.admit(state, model.num_classes, f"task model {model.method}"), model.num_classes, model.config,
                        None if thr is None else thr.detach().float().cpu())
        tensors = list(state.values())
        self._adopted[model] = (bt, tensors, sum(t._version for t in tensors))
        return bt

    def bank_stats(self) -> list[dict]:
        """Per bank: its method, slots and slots used (for the replica's metrics)."""
        with self._bank_lock:
            return [b.stats() for b in self.banks.values()]

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
    def _mixed_vit(self, site_maps) -> nn.Module:
        need = {}
        for sites in site_maps:
            for name, m in sites.items():
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
                                              self._segments, self._bank_runs))
        return vit.eval()

    def merged(self, model: PetlModel) -> PetlModel:
        """The merged form of a mergeable task (LRU-cached, ``merge_cache`` entries)."""
        key = id(model)
        hit = self._merged.get(key)
        if hit is not None and hit[0]() is model:
            self._merged.move_to_end(key)
            return hit[1]
        full = model.materialize() if isinstance(model, BankedTask) else model
        merged = full.merged().to(device=self.device, dtype=self.dtype).eval()
        self._merged[key] = (weakref.ref(model), merged)
        while len(self._merged) > self.merge_cache:
            self._merged.popitem(last=False)
        return merged

    def _blockwise(self, emb, rows, idx, models, infos, out) -> None:
        used, z0 = emb
        pos = {img: j for j, img in enumerate(used)}
        banked = {t: self._banked(models[t]) for t in dict.fromkeys(rows[i].task for i in idx)}

        def order_key(i):  # banked rows by bank and slot; the others task by task, one method side by side
            t = rows[i].task
            bt = banked[t]
            return (0, bt.bank.uid, bt.slot, t) if bt is not None else (1, models[t].method, t)

        order = sorted(idx, key=order_key)
        tasks = [rows[i].task for i in order]
        only = tasks[0] if tasks[0] == tasks[-1] else None
        runner = {t: models[t] for t in dict.fromkeys(tasks)}
        if only is not None:
            infos[only].solo += 1
        if only is not None and self.merge_cache > 0 and infos[only].solo > MERGE_AFTER and spec_of(models[only]).mergeable:
            runner[only] = self.merged(models[only])
            banked[only] = None
            vit, sites = runner[only].vit, {}
        else:
            sites = {t: infos[t].sites for t in runner if banked[t] is None}
            vit = self._mixed_vit([*sites.values(), *({n: m for n, (_, m, _) in b.sites.items()}
                                                      for b in {id(bt.bank): bt.bank for bt in banked.values()
                                                                if bt is not None}.values())])
        thresholds, known = {}, {}  # row -> its early-exit thresholds
        for i in order:
            t, thr = rows[i].task, rows[i].knobs.get("thresholds")
            if infos[t].runtime != "early_exit":
                thresholds[i] = []
                continue
            k = (t, None if thr is None else tuple(thr))
            if k not in known:
                known[k] = (banked[t] or runner[t]).exit_thresholds_for(thr).tolist()
            thresholds[i] = known[k]
        h = z0.index_select(0, torch.tensor([pos[rows[i].image] for i in order], device=z0.device))
        alive = list(order)
        segs = None  # {task: (start, end)} of the rows still running, redone when rows leave
        try:
            for b, blk in enumerate(vit.blocks, 1):
                if segs is None:
                    segs = _segments(alive, rows)
                    self._set_segments(segs, sites)
                    self._set_bank_runs(alive, rows, banked)
                h = blk(h)
                self.last_stats["row_blocks"] += len(alive)
                keep = torch.ones(len(alive), dtype=torch.bool)
                for t, (a, e) in segs.items():  # tasks that run as modules: their own exit heads
                    stage = infos[t].exits.get(b)
                    if stage is None or banked[t] is not None:
                        continue
                    logits = runner[t].exit_logits(h[a:e], stage).float()
                    self._leave(stage, stage == len(infos[t].exits) - 1, logits, alive, a, e, thresholds, keep, out,
                                lambda j, z, t=t, stage=stage: self._exit_result(t, z, stage, infos[t]))
                for r in self._bank_runs:  # banked rows: every task's head of this exit, gathered by slot
                    stage = _stage_at(r.bank, b)
                    if stage is None:
                        continue
                    head, params = r.bank.heads[stage]
                    feats = vit.forward_head(vit.norm(h[r.start:r.end]), pre_logits=True)
                    logits = r.cut(run_head(head, feats, lambda p: r.weights(params[p])).float())

                    def result(j, z, r=r, stage=stage):  # the row's own classes, not the bank's padded width
                        t = rows[alive[r.start + j]].task
                        return self._exit_result(t, z[:r.classes[j]], stage, infos[t])

                    self._leave(stage, stage == len(r.bank.exit_blocks) - 1, logits, alive, r.start, r.end,
                                thresholds, keep, out, result)
                if not keep.all():
                    h = h[keep.to(h.device)]
                    alive = [i for i, k in zip(alive, keep.tolist()) if k]
                    segs = None
                if not alive:
                    break
        finally:
            self._segments.clear()
            self._bank_runs.clear()
        self.last_stats["banks"] = len({id(bt.bank) for bt in banked.values() if bt is not None})

    def _leave(self, stage, last, logits, alive, a, e, thresholds, keep, out, result) -> None:
        """Rows ``a:e`` at exit ``stage``: those confident enough (all at the ``last`` exit) leave;
        ``result(j, logits row)`` makes row ``a + j``'s answer."""
        if last:
            leave = torch.ones(e - a, dtype=torch.bool)
        else:
            thr = torch.tensor([thresholds[i][stage] for i in alive[a:e]])
            leave = logits.softmax(-1).amax(-1).cpu() >= thr
        if not leave.any():
            return
        logits = logits.cpu()
        for j in leave.nonzero().flatten().tolist():
            out[alive[a + j]] = result(j, logits[j])
        keep[a:e] &= ~leave

    def _set_bank_runs(self, alive: list[int], rows, banked: dict) -> None:
        """The runs of banked rows: per bank (``gather="rows"``) or per task (``"segments"``), with
        each row's slot."""
        self._bank_runs.clear()
        start = 0
        while start < len(alive):
            bt = banked[rows[alive[start]].task]
            end = start + 1
            if bt is None:
                start = end
                continue
            same = (lambda o: o is not None and o.bank is bt.bank) if self.gather == "rows" else (lambda o: o is bt)
            while end < len(alive) and same(banked[rows[alive[end]].task]):
                end += 1
            slots = [banked[rows[i].task].slot for i in alive[start:end]]
            one = slots[0] if slots[0] == slots[-1] else None  # sorted by slot: one task iff first == last
            self._bank_runs.append(BankRun(start, end, bt.bank, one if one is not None else
                                           torch.tensor(slots, device=self.device),
                                           [banked[rows[i].task].num_classes for i in alive[start:end]]))
            start = end

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


def _stage_at(bank: Bank, block: int) -> int | None:
    try:
        return bank.exit_blocks.index(block)
    except ValueError:
        return None


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
