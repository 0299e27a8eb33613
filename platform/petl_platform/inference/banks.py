"""Adapter banks: resident tasks as data, not module trees (plain torch, no Ray).

A bank holds the tasks of one architecture (method, tensor shapes and the static values each adapted
site declares, ``MethodSpec.bank``): for every tensor of such a task's trainable state (adapters,
head, exit heads, buffers) one preallocated ``[slots, ...]`` tensor on the engine's device. A
resident task *is* a slot index (``BankedTask``): loading it copies its flat tensors into a free
slot, no module is built, and nothing is stacked per call. The engine gathers each row's weights by
slot at every site (``index_select`` on the bank, the BGMV idea of Punica / S-LoRA), or, for rows of
one task, reads its slot as a view.

Tasks of one bank may have different class counts: the class dimension of each exit's last Linear
is padded to the widest task of the bank, and each row's logits are cut to its own task's classes
(and its padded classes never count in an early exit's confidence).

One *template* model per bank (a ``PetlModel`` built once, with its own untrained tensors) gives
the frozen structure, the static values and the heads' layout; its tensors never answer a row.
On the host a bank is preallocated for the adapter store's byte budget (``Engine.bank_bytes``); its
free slots are allocated but never written, so they cost address space, not memory. Elsewhere it
starts at 8 slots. A full bank doubles (the tensors are reallocated and copied; a batch in flight
keeps reading the old ones, whose occupied slots hold the same values); banks never shrink.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import PetlError
from ..methods.base import AdapterModule, PetlModel
from ..methods.registry import spec_of


class NotBankable(Exception):
    """A model whose layout has no bank (a module without kernels, a head that is not linear)."""


def head_layout(template: PetlModel, stage: int, names: dict[int, str]) -> tuple[nn.Module, dict[str, str]]:
    """Exit ``stage``'s head of ``template`` and ``{parameter path inside the head: state key}``."""
    head = template.exit_head(stage)
    prefix = next((n for n, m in template.named_modules() if m is head), None)
    if prefix is None:
        raise NotBankable(f"exit {stage}'s head is not a module of the model")
    params = {}
    for pname, p in head.named_parameters():
        key = names.get(p.data_ptr())
        if key is None:
            raise NotBankable(f"head parameter {prefix}.{pname} is not in the trainable state")
        params[pname] = key
    _check_head(head)
    return head, params


def class_keys(template: PetlModel, names: dict[int, str]) -> set[str]:
    """The state keys of every exit's last Linear (weight and bias): their first dimension is the
    task's class count."""
    keys = set()
    for s in range(len(template.exit_blocks())):
        last = [m for m in template.exit_head(s).modules() if isinstance(m, nn.Linear)][-1:]
        for m in last:
            keys |= {names[p.data_ptr()] for p in m.parameters() if p.data_ptr() in names}
    return keys


def _check_head(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        return
    if isinstance(m, nn.Sequential):
        for c in m:
            _check_head(c)
        return
    if any(True for _ in m.parameters()):
        raise NotBankable(f"a head module of type {type(m).__name__} has no gathered form")


def run_head(head: nn.Module, x: torch.Tensor, w, prefix: str = "") -> torch.Tensor:
    """``head(x)`` for rows ``x [rows, D]`` with each row's own weights: ``w(path) -> [rows | 1, ...]``."""
    if isinstance(head, nn.Linear):
        y = torch.matmul(w(prefix + "weight"), x.unsqueeze(-1)).squeeze(-1)
        return y + w(prefix + "bias") if head.bias is not None else y
    if isinstance(head, nn.Sequential):
        for i, c in enumerate(head):
            x = run_head(c, x, w, f"{prefix}{i}.")
        return x
    return head(x)


class Bank:
    """The slots of one architecture's tasks; see the module docstring."""

    def __init__(self, key: str, template: PetlModel, backbone: nn.Module, slots: int = 8):
        self.key, self.template, self.backbone = key, template, backbone
        self.uid = id(self)
        state = template.trainable_state_dict()
        self.shapes = {k: tuple(v.shape) for k, v in state.items()}
        self.dtypes = {k: v.dtype for k, v in state.items()}
        self.device = next(iter(state.values())).device
        self.slot_bytes = sum(v.numel() * v.element_size() for v in state.values())
        names = {v.data_ptr(): k for k, v in state.items()}
        spec = spec_of(template)
        # per site: (kernel class, template module, {kernel argument: state key})
        self.sites: dict[str, tuple[type, AdapterModule, dict[str, str]]] = {}
        for name, m in template.adapter_sites().items():
            if spec.bank is None or type(m) not in spec.bank.modules:
                raise NotBankable(f"site {name}: {type(m).__name__} is not in {spec.name}'s bank layout")
            args = {}
            for arg, t in m.bank_tensors().items():
                if t.data_ptr() not in names:
                    raise NotBankable(f"site {name}: tensor {arg} is not in the trainable state")
                args[arg] = names[t.data_ptr()]
            self.sites[name] = (type(m), m, args)
        uses: dict[str, int] = {}
        for _, _, args in self.sites.values():
            for k in args.values():
                uses[k] = uses.get(k, 0) + 1
        self.shared = {k for k, n in uses.items() if n > 1}  # gathered once per pass (ARC's down-projection)
        self.exit_blocks = template.exit_blocks()
        self.heads = [head_layout(template, s, names) for s in range(len(self.exit_blocks))]
        self.class_keys = class_keys(template, names)
        self.classes = template.num_classes  # the class dimension of the class keys: the widest task's
        # empty, not zeros: a slot is written whole when a task is admitted and never read before, so
        # on the host the pages of free slots are never touched and cost no resident memory
        self.tensors = {k: torch.empty((slots, *shape), dtype=self.dtypes[k], device=self.device)
                        for k, shape in self.shapes.items()}
        self.capacity = slots
        self.measured = None  # (GFLOPs per image, exit costs) of its architecture, set by the engine
        self.free = list(range(slots - 1, -1, -1))
        self.used = 0
        self._lock = threading.Lock()
        self._stream = None  # CUDA: the side stream loads copy on

    @staticmethod
    def key_of(template: PetlModel) -> str:
        """What tasks of one bank share: method, tensor names and shapes, every site's module class
        and static values, and the exits."""
        sites = sorted((n, type(m).__qualname__, repr(m.bank_static())) for n, m in template.adapter_sites().items())
        state = template.trainable_state_dict()
        per_class = class_keys(template, {v.data_ptr(): k for k, v in state.items()})
        shapes = sorted((k, ["C", *v.shape[1:]] if k in per_class else list(v.shape), str(v.dtype)) for k, v in state.items())
        heads = [[type(m).__name__ for m in template.exit_head(s).modules()] for s in range(len(template.exit_blocks()))]
        return json.dumps([template.method, template.exit_blocks(), sites, shapes, heads])

    # ------------------------------------------------------------------ slots
    def admit(self, state: Mapping[str, torch.Tensor], classes: int, source: str = "state") -> int:
        """Copy a task of ``classes`` classes' flat tensors into a free slot (growing the bank when
        full, widening its class dimension for a wider task); its slot."""
        missing, unexpected = sorted(set(self.shapes) - set(state)), sorted(set(state) - set(self.shapes))
        if missing or unexpected:
            raise PetlError(f"{source} does not fit method {self.template.method!r}: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        for k, v in state.items():
            want = (classes, *self.shapes[k][1:]) if k in self.class_keys else self.shapes[k]
            if tuple(v.shape) != want:
                raise PetlError(f"{source}: tensor {k} has shape {tuple(v.shape)}, expected {want}")
        with self._lock:
            if classes > self.classes:
                self._widen(classes)
            if not self.free:
                self._grow()
            slot = self.free.pop()
            self.used += 1
        try:
            if self.device.type == "cuda":  # from pinned host memory on a side stream: batches keep running
                if self._stream is None:
                    self._stream = torch.cuda.Stream(self.device)
                with torch.cuda.stream(self._stream):
                    self._copy(slot, classes, {k: v.pin_memory() if v.device.type == "cpu" else v
                                               for k, v in state.items()})
                self._stream.synchronize()  # the slot is whole before any row can name it
            else:
                self._copy(slot, classes, state)
        except BaseException:
            self.release(slot)
            raise
        return slot

    def _copy(self, slot: int, classes: int, state: Mapping[str, torch.Tensor]) -> None:
        tensors = self.tensors
        for k, v in state.items():
            if k in self.class_keys:
                tensors[k][slot, :classes].copy_(v, non_blocking=True)
                tensors[k][slot, classes:].zero_()
            else:
                tensors[k][slot].copy_(v, non_blocking=True)

    def release(self, slot: int) -> None:
        with self._lock:
            self.free.append(slot)
            self.used -= 1

    def _grow(self) -> None:
        new = self.capacity * 2
        grown = {}
        for k, t in self.tensors.items():
            g = torch.empty((new, *t.shape[1:]), dtype=t.dtype, device=t.device)
            g[:self.capacity].copy_(t)
            grown[k] = g
        self.tensors = grown  # one assignment: a pass reads either the old tensors or the new ones
        self.free = list(range(new - 1, self.capacity - 1, -1)) + self.free
        self.capacity = new

    def _widen(self, classes: int) -> None:
        wide = dict(self.tensors)
        for k in self.class_keys:
            t = self.tensors[k]
            w = torch.zeros((t.shape[0], classes, *t.shape[2:]), dtype=t.dtype, device=t.device)
            w[:, :self.classes].copy_(t)  # (free slots' garbage too: never read)
            wide[k] = w
        self.tensors = wide
        self.classes = classes

    def slot_state(self, slot: int, classes: int) -> dict[str, torch.Tensor]:
        """The tensors of the task in slot ``slot`` (copies, cut to its ``classes``)."""
        return {k: (t[slot, :classes] if k in self.class_keys else t[slot]).clone() for k, t in self.tensors.items()}

    def stats(self) -> dict:
        return {"bank": self.template.method, "key": self.key, "slots": self.capacity, "used": self.used,
                "slot_bytes": self.slot_bytes, "classes": self.classes}


class BankedTask:
    """A resident task as data: its bank and slot, plus what serving reads of a task model
    (method, classes, budget curve, exit thresholds). Frees its slot when released or collected."""

    def __init__(self, bank: Bank, slot: int, num_classes: int, config, thresholds: torch.Tensor | None = None):
        self.bank, self.slot = bank, slot
        t = bank.template
        self.method, self.config, self.num_classes = t.method, config, num_classes
        self.backbone_name, self.backbone_fingerprint = t.backbone_name, t.backbone_fingerprint
        self.depth = t.depth
        self.classes = None
        self.task = None
        self.budget_thresholds: dict = {}
        self.budget_calibration: dict = {}
        self.nbytes = bank.slot_bytes
        self._thresholds = thresholds  # calibrated exit thresholds (Dyn-*), CPU fp32
        self._release = weakref.finalize(self, bank.release, slot)

    @property
    def stages(self) -> int:
        return len(self.bank.exit_blocks)

    def exit_blocks(self) -> list[int]:
        return list(self.bank.exit_blocks)

    def exit_thresholds_for(self, thresholds=None) -> torch.Tensor:
        if thresholds is None and self._thresholds is not None:
            return self._thresholds
        return self.bank.template.exit_thresholds_for(thresholds)  # checks the count; the template's own: none set

    def release(self) -> None:
        """Give the slot back (the store's eviction); the task must not run after this."""
        self._release()

    def state(self) -> dict[str, torch.Tensor]:
        return self.bank.slot_state(self.slot, self.num_classes)

    def materialize(self) -> PetlModel:
        """The task as a module tree (for the merged single-task path), built from its slot."""
        from ..methods import build_model

        t = self.bank.template
        model = build_model(t.method, self.bank.backbone, self.num_classes, **self.config.to_dict())
        model.load_trainable_state(self.state(), source=f"bank slot {self.slot}")
        model.to(device=self.bank.device, dtype=next(iter(self.bank.tensors.values())).dtype)
        return model.eval()
