"""One frozen backbone, the mixed-task engine on it, and the transform its images take: what every
place that answers tasks holds (a Ray Serve replica, a ``petl predict`` scoring actor, the MLflow
pyfunc flavor), assembled here once. Plain torch, no Ray::

    stack = Stack.build("petl_vit_t12_p4_32")          # on the GPU when there is one
    store = stack.store(settings, alias="champion")    # adapters from the registry, as slots of the engine's banks
    results = stack.engine.run(x, rows, {t: store.get(t).model for t in tasks})
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..backbones import SHIPPED, create_backbone
from ..data import make_transform
from ..errors import PetlError
from ..inference import Engine
from ..tracking.artifacts import budget_curve_of, model_from_state
from ..tracking.settings import CHAMPION, TrackingSettings
from .models import Fetched, TaskModelCache

# the ``dtype`` names of the Serve YAML; None keeps the weights' own (fp32)
DTYPES = {None: None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTO = "auto"


def pick_device(device: str | None = AUTO) -> str | None:
    """``"auto"``: CUDA when this process sees a GPU (a Serve replica or Ray actor with
    ``num_gpus``), else None; None leaves the weights where they were created (the CPU)."""
    if device == AUTO:
        return "cuda" if torch.cuda.is_available() else None
    return device


@dataclass
class Stack:
    """The frozen ``backbone`` (moved to the engine's device and dtype), the mixed-task ``engine``
    over it, and the ``transform`` from image to model input (the training one)."""

    backbone: torch.nn.Module
    engine: Engine
    transform: Callable

    @classmethod
    def build(cls, backbone: str | torch.nn.Module = SHIPPED, device: str | None = AUTO,
              dtype: str | None = None) -> Stack:
        """``backbone``: a name for ``create_backbone`` (shipped or local weights, never a download)
        or a backbone already created; ``device``: see ``pick_device``; ``dtype``: fp32, bf16 or fp16."""
        if dtype not in DTYPES:
            raise PetlError(f"dtype must be one of fp32, bf16, fp16; got {dtype!r}")
        bb = create_backbone(backbone) if isinstance(backbone, str) else backbone
        engine = Engine(bb, device=pick_device(device), dtype=DTYPES[dtype])
        return cls(bb, engine, make_transform(bb))

    @property
    def image_size(self) -> tuple[int, int]:
        return self.engine.image_size

    def prepare(self, task: str, model: torch.nn.Module) -> float:
        """The adapter store's ``prepare`` hook: the engine checks a loaded model (backbone
        fingerprint, depth), moves it to its device and dtype, and measures its GFLOPs per image."""
        return self.engine.info(task, model).gflops

    def admit(self, task: str, got: Fetched) -> tuple[object, float]:
        """The adapter store's ``admit`` hook: a fetched version becomes a slot of the engine's adapter
        bank for its architecture (per-row methods: no module is built), or a task model on the
        backbone (the other runtimes); with its GFLOPs per image."""
        cfg, source = got.config, f"{task} v{got.version}"
        banked = self.engine.admit(cfg["method"], cfg["hparams"], cfg["num_classes"], got.state, source=source)
        if banked is None:
            model = model_from_state(cfg, got.state, self.backbone, source=source)
            return model, self.prepare(task, model)
        banked.task, banked.classes = cfg.get("task"), cfg.get("classes")
        banked.budget_thresholds = budget_curve_of(banked.bank.template, cfg, source)
        calibration = cfg.get("budget_calibration")
        banked.budget_calibration = calibration if isinstance(calibration, dict) and banked.budget_thresholds else {}
        return banked, self.engine.info(task, banked).gflops

    def store(self, settings: TrackingSettings | None = None, alias: str = CHAMPION, **options) -> TaskModelCache:
        """The adapter store on this backbone, its models readied by the engine (``prepare``).
        ``settings`` default to the environment's; ``options`` are ``TaskModelCache``'s (capacity,
        capacity_mb, host_mb, refresh_s, load_timeout_s, ...)."""
        options.setdefault("admit", self.admit)
        self.engine.bank_bytes = int(float(options.get("capacity_mb", 256.0)) * 2**20)  # banks sized to the store
        return TaskModelCache(self.backbone, settings or TrackingSettings.from_env(), alias, prepare=self.prepare,
                              **options)
