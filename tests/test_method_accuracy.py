"""Every PETL method beats the linear probe on a structured offline task with the shipped backbone
after the same short fine-tune (the frozen features are weakest on structured tasks)."""

import pytest

from petl_platform import SHIPPED, build_model, create_backbone
from petl_platform.data import get_task, task_tensors
from petl_platform.training import TrainConfig, seed_everything, train

TASK = "dsprites_loc-1k"
METHODS = ["lora", "adapter", "repadapter", "arc", "arc_att", "dtl", "dtl_plus", "dyt", "dyn_lora"]
# Same short recipe for every method (the probe included): ~225 steps on 600 images, about four
# minutes for the whole file on 2 CPU cores.
RECIPE = TrainConfig(epochs=6, lr=5e-3, batch_size=16, progress=False)
N_TRAIN, N_TEST = 600, 512


@pytest.fixture(scope="module")
def setup():
    bb = create_backbone(SHIPPED)
    task = get_task(TASK)
    data = task_tensors(task, bb)
    data = {"train": tuple(t[:N_TRAIN] for t in data["train"]), "test": tuple(t[:N_TEST] for t in data["test"])}
    seed_everything(0)
    linear = train(build_model("linear", bb, len(task.classes)), data, RECIPE).accuracy
    return bb, len(task.classes), data, linear


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_method_beats_linear_probe(setup, method):
    bb, classes, data, linear = setup
    seed_everything(0)
    acc = train(build_model(method, bb, classes), data, RECIPE).accuracy
    assert acc > linear, f"{method}: {acc:.3f} vs linear probe {linear:.3f}"
