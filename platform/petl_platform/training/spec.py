"""What a job is, checked once: ``TrainSpec`` (``petl train``, ``run_train``) and ``SweepSpec``
(``petl sweep``, ``run_sweep``, ``run_vtab_suite``), as Ray has ``ScalingConfig``/``RunConfig``.

``validate()`` is the one place every up-front check lives: task names (a folder task's images are
scanned, headers only), the method and its hyperparameters, the training recipe, ``--budget``, the
search space, the backbone, the stores and the cluster address; non-finite numbers are refused.
It runs before any cluster starts, so a deterministic user error is one line, never a Ray trial
that fails (and is retried) with a traceback. ``names_only=True`` is what ``petl submit`` can
check on the submitting machine: data, weights, stores and cluster then live on the cluster, whose
``petl train``/``petl sweep`` runs the full check."""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass, field
from urllib.parse import urlparse

from ..backbones import SHIPPED
from ..errors import PetlError
from ..tracking.settings import CHAMPION, TrackingSettings


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """What a fine-tune and a sweep share."""
    settings: TrackingSettings  # MLflow store, artifact root, Ray storage
    method: str = "linear"
    backbone: str = SHIPPED  # shipped name, timm ViT name, weights file or ARCH@FILE
    hparams: dict = field(default_factory=dict)  # fixed method hyperparameters (--set)
    train: dict = field(default_factory=dict)  # TrainConfig overrides (--epochs, --lr, ...)
    budget: float | None = None  # dyn_*: calibrate the exits to this fraction of full-depth FLOPs
    experiment: str = "petl"  # MLflow experiment
    name: str | None = None  # Ray experiment name (default: from the task, method and time)
    address: str | None = None  # Ray cluster (default: the job's cluster, else a local one)
    max_failures: int = 1  # restarts from the last checkpoint after a failure that is not the user's
    model_name: str = "{task}"  # registered model name; {task} and {method} expand

    def _check_common(self, tasks: list[str], train: dict) -> None:
        from ..data import check_task_name
        from ..methods import get_method
        from .run import train_config

        for t in tasks:
            check_task_name(t)
        _finite("--set", get_method(self.method).config_cls.from_dict(self.hparams, self.method).to_dict())
        _finite("training", train_config(self.method, train).to_dict())
        check_budget(self.method, self.budget)
        if not isinstance(self.max_failures, int) or self.max_failures < 0:
            raise PetlError(f"--max-failures must be an integer >= 0; got {self.max_failures}")
        try:
            self.model_name.format(task="x", method=self.method)
        except (KeyError, IndexError, ValueError) as e:
            raise PetlError(f"bad --model-name {self.model_name!r}: only {{task}} and {{method}} expand ({e})") from None

    def _check_reachable(self) -> None:
        """The cluster address and the stores (MLflow, artifact bucket, Ray storage)."""
        if self.address:
            check_address(self.address)
        self.settings.prepare()


@dataclass(frozen=True, kw_only=True)
class TrainSpec(JobSpec):
    """One fine-tune: Ray Train with ``workers`` data-parallel ranks, or ``local`` plain torch."""
    task: str
    workers: int = 1
    use_gpu: bool = False  # one GPU per worker
    cpus_per_worker: float = 1
    tags: dict = field(default_factory=dict)  # extra tags on the MLflow run
    local: bool = False  # plain torch in this process: no Ray, no MLflow
    register: bool = False  # register the adapter (challenger; champion when at least as good)
    promote: bool = False  # with register: move the champion regardless

    def validate(self, *, names_only: bool = False) -> None:
        """Every up-front check; ``names_only``: only those that need no data, weights, store or cluster."""
        if self.promote and not self.register:
            raise PetlError("--promote forces the champion move of --register: add --register")
        if self.register and self.local:
            raise PetlError("--register needs the MLflow run a Ray Train fine-tune logs; --local logs nothing to "
                            "MLflow: drop --local (a local Ray cluster is started when --address is not given)")
        self._check_common([self.task], self.train)
        if not isinstance(self.workers, int) or self.workers < 1:
            raise PetlError(f"--workers must be an integer >= 1; got {self.workers}")
        _positive("--cpus-per-worker", self.cpus_per_worker)
        if names_only:
            return
        check_data([self.task])
        _check_backbone(self.backbone)
        if not self.local:
            self._check_reachable()


@dataclass(frozen=True, kw_only=True)
class SweepSpec(JobSpec):
    """A Ray Tune search per task (``tasks``), or the VTAB-1k protocol over ``vtab_root``
    (``suite="vtab1k"``: a sweep per dataset, then the best config's final fit)."""
    tasks: tuple[str, ...] = ()
    space: tuple[str, ...] | dict | None = None  # NAME=DIST(ARGS) items (default: the method's space)
    samples: int = 8  # trials per task (x the grid size for grid(...))
    epochs: int = 10  # per trial; ASHA's max_t
    scheduler: str = "asha"  # asha | hyperband | fifo (SCHEDULERS)
    grace_period: int | None = None  # ASHA's first rung in epochs (default 1; see asha_rungs)
    reduction_factor: float | None = None  # ASHA's or Hyperband's eta (default: derived from epochs, see asha_rungs)
    max_concurrent: int | None = None
    cpus_per_trial: float = 1
    gpus_per_trial: float | None = None  # default: 0.5 where there are GPUs
    resume: bool = False  # continue the sweep ``name`` from its Ray storage
    register: bool = True  # register each task's best trial
    alias: str = CHAMPION  # moved only when the best trial is at least as good on the same val split
    promote: bool = False  # move ``alias`` to the best trial regardless
    progress: bool = True  # Tune's progress table
    suite: str | None = None  # "vtab1k"
    vtab_root: str | None = None  # suite: ROOT/<dataset>/{train800,val200,train800val200,test}.txt
    datasets: tuple[str, ...] | None = None  # suite: only these datasets (default: all present)

    def validate(self, *, names_only: bool = False) -> dict:
        """Every up-front check; returns the parsed search space (``{}`` when ``names_only`` and
        no ``space`` was given: the default space needs the backbone's depth)."""
        from ..tracking.runs import CHALLENGER
        from .space import default_space, parse_space

        self._check_suite_flags()
        if self.scheduler not in SCHEDULERS:
            raise PetlError(f"unknown scheduler {self.scheduler!r}; use {', '.join(SCHEDULERS)}")
        for flag, v in (("--samples", self.samples), ("--epochs", self.epochs), ("--grace-period", self.grace_period)):
            if v is not None and (not isinstance(v, int) or v < 1):
                raise PetlError(f"{flag} must be an integer >= 1; got {v}")
        if self.reduction_factor is not None and (not _is_finite(self.reduction_factor) or self.reduction_factor <= 1):
            raise PetlError(f"--reduction-factor must be a finite number > 1; got {self.reduction_factor}")
        if self.scheduler != "asha" and self.grace_period is not None:
            raise PetlError(f"--grace-period is ASHA's first rung; --scheduler {self.scheduler} takes none "
                            "(Hyperband's brackets start at --epochs / reduction factor^k)")
        if self.scheduler == "asha" and self.grace_period is not None and self.grace_period > self.epochs:
            raise PetlError(f"--grace-period {self.grace_period} is past the trials' last epoch (--epochs "
                            f"{self.epochs}): ASHA's first rung must be within a trial; lower it or raise --epochs")
        if self.max_concurrent is not None and (not isinstance(self.max_concurrent, int) or self.max_concurrent < 1):
            raise PetlError(f"--max-concurrent must be an integer >= 1; got {self.max_concurrent}")
        if self.scheduler == "hyperband" and self.max_concurrent is not None:
            # Tune creates a trial only when the limit lets it run: a bracket would then be compared
            # before its later trials exist (and stop nothing)
            raise PetlError("--max-concurrent does not go with --scheduler hyperband, which needs each bracket's "
                            "trials created before it compares them; set how many run at once with --cpus-per-trial")
        _positive("--cpus-per-trial", self.cpus_per_trial)
        if self.gpus_per_trial is not None and (not _is_finite(self.gpus_per_trial) or self.gpus_per_trial < 0):
            raise PetlError(f"--gpus-per-trial must be a finite number >= 0; got {self.gpus_per_trial}")
        if self.promote and not self.register:
            raise PetlError("--promote moves the champion to the registered best trial: drop --no-register")
        if self.register and self.alias == CHALLENGER:
            raise PetlError(f"--alias {CHALLENGER} is reserved for the newest version; pick another champion alias")
        self._check_common(list(self.tasks), {**self.train, "epochs": self.epochs})
        parsed = parse_space(self.space, self.method) if self.space else {}
        if names_only:
            return parsed
        if self.suite:
            self.suite_datasets()
        check_data(list(self.tasks))
        depth = len(_check_backbone(self.backbone).blocks)
        if not parsed:  # the default space, less what the user fixed (--set, --lr, ...): theirs stays fixed
            parsed = parse_space(default_space(self.method, depth, fixed=[*self.hparams, *self.train]), self.method)
        if not parsed:
            raise PetlError(f"nothing to search for {self.method!r} (its default space is fixed by --set/--lr): "
                            "give --space NAME=DIST(ARGS)")
        self._check_reachable()
        return parsed

    def asha(self) -> tuple[int, float, list]:
        """ASHA's ``(grace_period, reduction_factor, rungs)`` for this sweep (``asha_rungs``)."""
        return asha_rungs(self.epochs, self.reduction_factor, self.grace_period)

    def _check_suite_flags(self) -> None:
        if self.suite is None:
            if not self.tasks or self.vtab_root or self.datasets:
                raise PetlError("petl sweep needs --task T[,T2] (--vtab-root and --datasets go with --suite vtab1k)")
            return
        if self.suite != "vtab1k":
            raise PetlError(f"unknown --suite {self.suite!r}; the one suite is vtab1k")
        if not self.vtab_root:
            raise PetlError("--suite vtab1k needs --vtab-root ROOT "
                            "(ROOT/<dataset>/{train800,val200,train800val200,test}.txt)")
        if self.tasks or self.resume:
            raise PetlError("--suite vtab1k takes its tasks from --vtab-root (and --datasets), not --task; "
                            "--resume is not supported (rerun the missing --datasets under a new --name)")

    def suite_datasets(self) -> list[dict]:
        """The VTAB-1k datasets the suite runs (``data.vtab.discover`` rows); checks the tree."""
        from ..data.vtab import discover, select_datasets

        return select_datasets(discover(self.vtab_root), list(self.datasets) if self.datasets else None)


# ``petl sweep --scheduler``: ASHA (asynchronous successive halving, the default), Tune's synchronous
# Hyperband (brackets of successive halving from several first rungs; trials pause at a rung until
# their bracket is there) or FIFO (every trial runs every epoch: the full grid). P7 in
# docs/benchmarks.md measures the three side by side. BOHB (Tune's TuneBOHB + HyperBandForBOHB)
# needs hpbandster, whose last release (0.7.4, 2018) is not among the project's dependencies.
SCHEDULERS = ("asha", "hyperband", "fifo")

# ASHA's reduction factor when none is given: Hyperband's eta of 3 (the best third of the trials at a
# rung go on). With Tune's default of 4, a 9-epoch sweep had two rungs (1, 4), and ASHA spent 0.41x
# the full grid's trial-epochs to end 0.57 pt behind it (P7 in docs/benchmarks.md).
ASHA_REDUCTION_FACTOR = 3
ASHA_MIN_RUNGS = 3


def asha_rungs(epochs: int, reduction_factor: float | None = None,
               grace_period: int | None = None) -> tuple[int, float, list]:
    """ASHA's ``(grace_period, reduction_factor, rungs)`` for trials of ``epochs`` epochs (its
    ``max_t``). ``rungs`` are the epochs at which ASHA compares trials and stops the weaker ones,
    ``grace_period * reduction_factor**k <= epochs``, as Tune's ASHAScheduler places them (a rung at
    ``epochs`` itself stops nothing: the trial is done). Given values win; else the grace period is
    1 epoch and the reduction factor 3 where that makes ``ASHA_MIN_RUNGS`` rungs (from 9 epochs: 1,
    3, 9; 27 epochs: 1, 3, 9, 27), else 2 where that makes more rungs than 3 (2 epochs: 1, 2; 4 to 8
    epochs: 1, 2, 4 and 8 at 8), else 3 (1 epoch: one rung, nothing stopped; 3 epochs: 1, 3)."""
    grace = 1 if grace_period is None else grace_period
    rf = reduction_factor
    if rf is None:
        three, two = len(_rungs(epochs, grace, 3)), len(_rungs(epochs, grace, 2))
        rf = ASHA_REDUCTION_FACTOR if three >= ASHA_MIN_RUNGS or three >= two else 2
    return grace, rf, _rungs(epochs, grace, rf)


def _rungs(max_t: int, grace: int, rf: float) -> list:
    out, k = [], 0
    while (t := grace * rf ** k) <= max_t * (1 + 1e-9):  # a float rf: its power may land a hair above
        out.append(int(round(t)) if abs(t - round(t)) < 1e-9 else t)
        k += 1
    return out


def check_address(address: str) -> str | None:
    """``petl train/sweep --address``: a GCS address (``HOST:6379``), ``auto`` or ``ray://``; fail
    fast when nothing listens there instead of letting ``ray.init`` retry for a minute. Returns
    ``HOST:PORT`` for a GCS address (whose token auth ``cluster.connect.ensure_ray`` settles before
    ``ray.init``), else None."""
    if address.startswith(("http://", "https://")):
        raise PetlError(f"{address} is a dashboard (Jobs API) address: use `petl submit ... --address {address}`; "
                        "`--address` here takes HOST:6379, auto or ray://HOST:10001")
    if address in ("auto", "local"):
        return None
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port or (10001 if address.startswith("ray://") else 6379)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as e:
        raise PetlError(f"cannot reach Ray cluster at {host}:{port} ({e.strerror or e}); is `ray start --head` running?") from None
    return None if address.startswith("ray://") else f"{host}:{port}"


def check_budget(method: str, budget: float | None) -> None:
    """``--budget`` calibrates early exits: the method's spec checks it (``MethodSpec.check_budget``)."""
    from ..methods import get_method

    if budget is not None:
        get_method(method).check_budget(budget)


def check_data(tasks: list[str]) -> None:
    """What can be checked of a task's data without decoding it: a folder task's tree is scanned
    (``data.folder.check_folder_task``: train/ and test/, every image header, at least 2 classes)."""
    from ..data.folder import check_folder_task

    for t in tasks:
        if t.startswith("folder:"):
            check_folder_task(t[len("folder:"):])


def _check_backbone(backbone: str):
    """An unknown name or a bad weights file fails here, not on a worker."""
    from ..backbones import create_backbone

    return create_backbone(backbone)


def _is_finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(flag: str, v) -> None:
    if not _is_finite(v) or v <= 0:
        raise PetlError(f"{flag} must be a finite number > 0; got {v}")


def _finite(label: str, values: dict) -> None:
    """NaN and infinity pass ``>`` checks the wrong way (``nan > 0`` is False, ``inf > 0`` True)."""
    for k, v in values.items():
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, float) and not math.isfinite(x):
                raise PetlError(f"{label} {k}={x}: expected a finite number")
