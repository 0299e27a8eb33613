import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from petl_platform import SHIPPED, PetlError, build_model
from petl_platform.backbones.factory import ASSETS
from petl_platform.training import TrainConfig, train
from petl_platform.training.run import run_finetune


def _toy_data(n=64, classes=3):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.1 + y[:, None, None, None].float()
    return {"train": (x, y), "val": (x[:16], y[:16]), "test": (x[:16], y[:16])}


def test_linear_probe_learns_and_only_head_trains(tiny_backbone):
    model = build_model("linear", tiny_backbone, 3)
    before = {k: v.clone() for k, v in tiny_backbone.state_dict().items()}
    res = train(model, _toy_data(), TrainConfig(epochs=10, lr=2e-2, batch_size=8, progress=False))
    assert res.accuracy > 0.9 and res.trainable_params == 0
    assert all(torch.equal(before[k], v) for k, v in tiny_backbone.state_dict().items())
    assert len(res.history) == 10 and res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_checkpoint_holds_trainable_state_only_and_resumes(tiny_backbone, tmp_path):
    data = _toy_data()
    cfg = TrainConfig(epochs=2, lr=1e-2, progress=False, checkpoint_dir=str(tmp_path), cache_trunk=False)
    full = train(build_model("linear", tiny_backbone, 3), data, cfg)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain tensors and containers only
    assert len(full.history) == 2
    assert set(state["model"]) == {"head.weight", "head.bias"} and state["epoch"] == 1
    # Resume from epoch 1's checkpoint: the second run only trains the remaining epoch.
    state["epoch"], state["history"] = 0, state["history"][:1]
    torch.save(state, tmp_path / "checkpoint.pt")
    resumed = train(build_model("linear", tiny_backbone, 3), data,
                    TrainConfig(**{**cfg.to_dict(), "resume": True}))
    assert len(resumed.history) == 2


class _RunsOnLoad:
    """A pickle that runs code when it loads: what a tampered checkpoint in shared storage holds."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return (Path.touch, (Path(self.flag),))


def test_resume_refuses_a_checkpoint_that_runs_code(tiny_backbone, tmp_path):
    data = _toy_data()
    cfg = TrainConfig(epochs=1, lr=1e-2, progress=False, checkpoint_dir=str(tmp_path), cache_trunk=False)
    train(build_model("linear", tiny_backbone, 3), data, cfg)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    state["history"].append(_RunsOnLoad(tmp_path / "pwned"))
    torch.save(state, tmp_path / "checkpoint.pt")
    with pytest.raises(PetlError, match="not a plain tensor checkpoint"):
        train(build_model("linear", tiny_backbone, 3), data, TrainConfig(**{**cfg.to_dict(), "resume": True, "epochs": 2}))
    assert not (tmp_path / "pwned").exists()


def test_seeded_training_is_deterministic(tiny_backbone):
    data = _toy_data()
    cfg = TrainConfig(epochs=2, lr=1e-2, progress=False, seed=3)
    torch.manual_seed(7)
    a = train(build_model("linear", tiny_backbone, 3), data, cfg).history
    torch.manual_seed(7)
    b = train(build_model("linear", tiny_backbone, 3), data, cfg).history
    assert a[-1]["train_loss"] == pytest.approx(b[-1]["train_loss"], rel=1e-6)


def test_linear_probe_on_shipped_backbone_matches_model_card():
    card = json.loads((ASSETS / f"{SHIPPED}.json").read_text())
    expected = card["linear_probe"]["digits-1k"]["shipped"]
    res = run_finetune("digits-1k", "linear", SHIPPED)
    assert abs(res["accuracy"] - expected) <= 0.02, (res["accuracy"], expected)


def _petl(*args):
    return subprocess.run([sys.executable, "-m", "petl_platform.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize("args, message", [
    (["train", "--task", "imagenet"], "unknown task 'imagenet'; valid tasks:"),
    (["train", "--task", "digits", "--method", "nope"], "unknown method 'nope'; valid methods:"),
    (["train", "--task", "digits", "--set", "bogus=1"], "has no hyperparameter 'bogus'"),
    (["train", "--task", "digits", "--backbone", "vit_nope"], "unknown backbone 'vit_nope'"),
    (["train", "--task", "folder:/nonexistent/dir"], "does not exist"),
    (["train", "--task", "digits", "--epochs", "0"], "epochs must be >= 1"),
])
def test_cli_bad_input_one_line_nonzero(args, message, petl_cli):
    r = petl_cli(*args)  # in this process (conftest); the interpreter's own run is the test below
    assert r.returncode == 2
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_cli_bad_input_one_line_nonzero_in_a_new_interpreter():
    """`python -m petl_platform.cli` as a user starts it: nothing else on stderr (import-time
    warnings, logging set-up), one line, exit 2."""
    r = _petl("train", "--task", "imagenet")
    assert r.returncode == 2
    assert "unknown task 'imagenet'; valid tasks:" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr


def test_cli_train_json(tmp_path, petl_cli):
    r = petl_cli("train", "--local", "--task", "digits-1k", "--method", "linear", "--epochs", "2", "--json",
                 "--out", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"accuracy", "trainable_params", "wall_s", "peak_mem_mb"} <= set(out)
    assert 0.1 < out["accuracy"] <= 1 and out["trainable_params"] == 0
    assert (tmp_path / "a" / "adapter.safetensors").exists()
