"""MLmodel files written before the pyfunc flavor moved to ``serving/pyfunc.py`` name
``petl_platform.tracking.pyfunc`` as their loader module: they still load, and answer as a model
saved now does. Saving an adapter never imports the engine or the serving library."""

import subprocess
import sys

import mlflow.pyfunc
import numpy as np
import torch
import yaml

from petl_platform import build_model, create_backbone, save_adapter
from petl_platform.tracking.mlmodel import LOADER_MODULE
from platform_stack import write_tiny_backbone


def test_an_mlmodel_naming_the_old_loader_module_still_loads(tmp_path):
    weights = write_tiny_backbone(tmp_path)
    torch.manual_seed(0)
    model = build_model("lora", create_backbone(weights), 3, rank=2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    new, old = save_adapter(model, tmp_path / "new", task="t", classes=["a", "b", "c"]), tmp_path / "old"
    save_adapter(model, old, task="t", classes=["a", "b", "c"])
    meta = yaml.safe_load((new / "MLmodel").read_text())
    assert meta["flavors"]["python_function"]["loader_module"] == LOADER_MODULE == "petl_platform.serving.pyfunc"
    text = (old / "MLmodel").read_text().replace(LOADER_MODULE, "petl_platform.tracking.pyfunc")
    (old / "MLmodel").write_text(text)
    assert "loader_module: petl_platform.tracking.pyfunc" in text
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    a = mlflow.pyfunc.load_model(str(new)).predict(pixels)
    b = mlflow.pyfunc.load_model(str(old)).predict(pixels)
    assert list(a["label"]) == list(b["label"])
    assert np.allclose(np.stack(a["probabilities"]), np.stack(b["probabilities"]))


def test_saving_an_adapter_imports_neither_the_engine_nor_serving(tmp_path):
    code = ("import sys, torch; from petl_platform import build_model, create_backbone, save_adapter; "
            "bb = create_backbone('vit_tiny_patch16_224', img_size=32, patch_size=4, depth=2, embed_dim=32, num_heads=2); "
            f"save_adapter(build_model('lora', bb, 2, rank=2), {str(tmp_path / 'a')!r}); "
            "print(sorted(m for m in sys.modules if m.startswith(('petl_platform.inference', 'petl_platform.serving'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "a" / "MLmodel").exists()
