"""One spec, checked once: every deterministic user error of ``petl train``/``petl sweep`` (a
non-finite number, a folder task with one class, a corrupt image or no train/, a bad search space,
an unreachable cluster) is one ``petl: error:`` line and exit 2 before any cluster starts."""

import io

import numpy as np
import pytest
from PIL import Image

from petl_platform.cli import main
from petl_platform.data.folder import check_folder_task
from petl_platform.errors import PetlError
from petl_platform.tracking.settings import TrackingSettings
from petl_platform.training.spec import SweepSpec, TrainSpec
from platform_stack import free_port


def write_folder(root, classes=("a", "b"), n=3, size=16):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / split / cls / f"{i}.png")
    return root


def truncated_jpeg() -> bytes:
    """A JPEG whose header is intact and whose pixel data is cut: the header scan passes, decoding fails."""
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    return data[:data.index(b"\xff\xda") + 20]


@pytest.fixture
def no_cluster(monkeypatch, tmp_path):
    """PETL_HOME in tmp, and any attempt to start or join a cluster fails the test."""
    import petl_platform.cluster.connect as distributed

    def refuse(*args, **kwargs):
        raise AssertionError("a cluster was started for a deterministic user error")

    monkeypatch.setenv("PETL_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(distributed, "ensure_ray", refuse)


def _folder_case(tmp_path, kind: str) -> str:
    root = tmp_path / kind
    if kind == "one_class":
        write_folder(root, classes=("only",))
    elif kind == "corrupt_png":
        write_folder(root)
        (root / "train" / "b" / "corrupt.png").write_bytes(b"not a png")
    elif kind == "no_train":
        write_folder(root)
        import shutil
        shutil.rmtree(root / "train")
    return f"folder:{root}"


CASES = [  # (argv after the command, expected message part); {folder:KIND} is replaced by such a folder task
    (["train", "--task", "digits-1k", "--method", "dyn_lora", "--budget", "nan"], "--budget is the fraction"),
    (["train", "--task", "digits-1k", "--lr", "inf"], "lr=inf: expected a finite number"),
    (["train", "--task", "{folder:one_class}"], "has 1 class with images under train/ (only)"),
    (["train", "--task", "{folder:corrupt_png}"], "cannot read image "),
    (["train", "--task", "{folder:no_train}"], "needs train/<class>/ subfolders"),
    (["train", "--task", "{folder:one_class}", "--local"], "a classifier needs at least 2"),
    (["sweep", "--task", "{folder:corrupt_png}", "--method", "linear"], "corrupt.png"),
    (["sweep", "--task", "digits-1k", "--method", "dyn_lora", "--space", "p_m=uniform(0.5,0.1)"], "low must be below high"),
    (["sweep", "--task", "digits-1k", "--method", "lora", "--reduction-factor", "nan"], "--reduction-factor"),
    (["sweep", "--suite", "vtab1k", "--vtab-root", "/nowhere", "--method", "linear"], "/nowhere"),
    (["train", "--task", "digits-1k", "--address", "127.0.0.1:{port}"], "cannot reach Ray cluster"),
    (["sweep", "--task", "digits-1k", "--address", "127.0.0.1:{port}"], "cannot reach Ray cluster"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_user_errors_are_one_line_before_any_cluster(argv, message, tmp_path, capsys, no_cluster):
    import ray

    port = free_port()
    argv = [_folder_case(tmp_path, a[len("{folder:"):-1]) if a.startswith("{folder:") else a.format(port=port)
            for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("petl: error: ") and message in err[0], err
    assert not ray.is_initialized()


def test_folder_scan_counts_and_reads_headers_only(tmp_path):
    root = write_folder(tmp_path / "ok", classes=("cat", "dog", "empty"))
    for f in (root / "train" / "empty").iterdir():
        f.unlink()
    (root / "train" / "dog" / "notes.txt").write_text("not an image: skipped")
    assert check_folder_task(str(root)) == {"train": {"cat": 3, "dog": 3, "empty": 0},
                                            "test": {"cat": 3, "dog": 3, "empty": 3}}
    # a header that opens is all the scan asks: a JPEG cut after its header passes here and fails
    # where the pixels are decoded (a Ray worker), which test_training_failures.py covers
    (root / "train" / "cat" / "cut.jpg").write_bytes(truncated_jpeg())
    assert check_folder_task(str(root))["train"]["cat"] == 4
    (root / "test" / "bird").mkdir()
    with pytest.raises(PetlError, match=r"classes not in train/: \['bird'\]"):
        check_folder_task(str(root))


def test_library_callers_get_the_same_checks(tmp_path, no_cluster):
    from petl_platform.cluster.train import run_train
    from petl_platform.cluster.tune import run_sweep

    settings = TrackingSettings.from_env()
    task = _folder_case(tmp_path, "one_class")
    with pytest.raises(PetlError, match="at least 2"):
        run_train(TrainSpec(task=task, settings=settings))
    with pytest.raises(PetlError, match="at least 2"):
        run_sweep(SweepSpec(tasks=(task,), settings=settings))
    with pytest.raises(PetlError, match="--workers must be an integer >= 1"):
        TrainSpec(task="digits-1k", settings=settings, workers=0).validate()
    with pytest.raises(PetlError, match=r"--set alpha=inf: expected a finite number"):
        SweepSpec(tasks=("digits-1k",), method="lora", settings=settings, hparams={"alpha": "inf"}).validate()
    with pytest.raises(PetlError, match=r"training weight_decay=nan: expected a finite number"):
        TrainSpec(task="digits-1k", settings=settings, train={"weight_decay": float("nan")}).validate()
    with pytest.raises(PetlError, match="--gpus-per-trial"):
        SweepSpec(tasks=("digits-1k",), settings=settings, gpus_per_trial=float("inf")).validate()


def test_submit_checks_names_only(tmp_path, capsys, monkeypatch, no_cluster):
    """``petl submit``: the weights, stores and cluster are the cluster's; only names and numbers are checked here."""
    import petl_platform.cluster.jobs as jobs_client

    monkeypatch.setattr(jobs_client, "submit", lambda *a, **k: {"job_id": "j1", "status": "SUCCEEDED"})
    assert main(["submit", "train", "--task", "digits-1k", "--backbone", "/on/the/cluster/vit.safetensors"]) == 0
    assert main(["submit", "sweep", "--task", "digits-1k", "--method", "lora", "--budget", "inf"]) == 2
    assert "got inf" in capsys.readouterr().err


@pytest.mark.parametrize("task, slug", [
    ("folder:/data/blood", "folder-blood"), ("folder:/data/my tree/", "folder-my_tree"),
    ("vtab:/data/vtab-1k/dtd", "vtab-dtd"), ("vtab:/data/vtab-1k/dtd?final", "vtab-dtd-final"),
    ("digits-1k", "digits-1k"),
])
def test_a_train_runs_default_name_is_the_task_slug(task, slug):
    """The Ray Train run name (its checkpoint folder under ray_results/, the MLflow run name) holds
    no ':' or '/' of a folder or VTAB task: no nested folders, no local path in the run name."""
    from petl_platform.cluster.train import default_name

    name = default_name(task, "lora", when=0)
    assert name.startswith(f"train-{slug}-lora-") and ":" not in name and "/" not in name and " " not in name
