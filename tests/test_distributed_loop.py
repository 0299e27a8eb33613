"""Data-parallel training in the plain loop: 2 gloo ranks, each on half of every batch, must end
with the same weights on both ranks and the same weights as one process on the whole batch."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from petl_platform import build_model
from petl_platform.training import TrainConfig, train

CFG = TrainConfig(epochs=2, batch_size=16, lr=1e-2, progress=False, cache_trunk=False, device="cpu")


def _data():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 3, (64,), generator=g)
    return {"train": (x, y), "val": (x[:16], y[:16])}


def _model(backbone):
    torch.manual_seed(0)
    return build_model("lora", backbone, num_classes=3, rank=2)


def _rank(rank, backbone, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = _model(backbone)
    train(model, _data(), CFG, rank=rank, world=2)
    torch.save(model.trainable_state_dict(), f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_match_each_other_and_one_process(tmp_path, tiny_backbone):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank, args=(tiny_backbone, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = _model(tiny_backbone)
    before = {k: v.clone() for k, v in single.trainable_state_dict().items()}
    train(single, _data(), CFG)
    ref = single.trainable_state_dict()
    for k in ref:
        assert torch.equal(r0[k], r1[k]), f"ranks diverged on {k}"
        assert torch.allclose(r0[k], ref[k], atol=2e-5), f"2 ranks != 1 process on {k}"
    assert any(not torch.allclose(before[k], ref[k]) for k in ref)  # training moved the weights
