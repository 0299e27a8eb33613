"""Pretrain the offline ViT that ships with the package (``python -m jobs.pretrain``).

Recipe: a 12-block ViT (width 128, 4 heads, patch 4, 32 px) trained supervised, from scratch, on
a mixture of three offline tasks (Fashion-MNIST, openclipart categories, font letters), one
linear head per task, with shift/flip augmentation, AdamW and a cosine schedule. The structured
tasks and sklearn digits are held out of pretraining so the model card can report how the
frozen features transfer to tasks the backbone never saw.

``--card`` (run after pretraining) measures linear probes of the shipped weights vs random
weights on every task with ``petl_platform``'s own training loop and writes the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from petl_platform.backbones.factory import ASSETS, SHIPPED
from petl_platform.data import get_task, make_transform, to_tensors

ARCH = "vit_tiny_patch16_224"
MODEL_ARGS = {"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 12, "num_heads": 4}
PRETRAIN_TASKS = ["fashion_mnist", "clipart", "letters"]
HELD_OUT = ["digits", "dsprites_loc", "dsprites_ori", "norb_azimuth", "clevr_count"]
FLIP_OK = {"fashion_mnist", "clipart"}  # letters must not be mirrored


def augment(x: torch.Tensor, flip: bool, pad: int = 3) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels (reflect padding) and optional h-flip."""
    n, _, h, w = x.shape
    xp = F.pad(x, (pad,) * 4, mode="reflect")
    dx, dy = torch.randint(0, 2 * pad + 1, (2,))
    x = xp[:, :, dy:dy + h, dx:dx + w]
    if flip:
        m = torch.rand(n) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(3), x)
    return x


def _save(model, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"{SHIPPED}.safetensors"), metadata={"format": "pt"})


def pretrain(steps: int, batch: int, lr: float, seed: int, out: Path) -> None:
    torch.manual_seed(seed)
    model = timm.create_model(ARCH, pretrained=False, num_classes=0, **MODEL_ARGS)
    tf = make_transform(model)
    data = {}
    for name in PRETRAIN_TASKS:
        task = get_task(name)
        data[name] = to_tensors(*task.splits["train"], tf)
        print(f"{name}: {len(data[name][1])} train images", flush=True)
    heads = torch.nn.ModuleDict({n: torch.nn.Linear(model.num_features, len(get_task(n).classes)) for n in PRETRAIN_TASKS})
    params = list(model.parameters()) + list(heads.parameters())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm))))
    # Sample tasks in proportion to the square root of their size so the small ones are not drowned.
    sizes = torch.tensor([len(data[n][1]) for n in PRETRAIN_TASKS], dtype=torch.float)
    probs = sizes.sqrt() / sizes.sqrt().sum()
    model.train()
    t0, bar = time.time(), tqdm(range(steps), desc="pretrain", mininterval=30)
    for step in bar:
        name = PRETRAIN_TASKS[int(torch.multinomial(probs, 1))]
        x, y = data[name]
        idx = torch.randint(0, len(y), (batch,))
        xb = augment(x[idx], name in FLIP_OK)
        loss = F.cross_entropy(heads[name](model(xb)), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 100 == 99:  # a usable snapshot even if the run is cut short
            _save(model, out)
        if step % 50 == 0:
            bar.set_postfix(task=name, loss=f"{loss.item():.3f}")
            print(f"step {step} {name} loss {loss.item():.3f} elapsed {time.time() - t0:.0f}s", flush=True)
    _save(model, out)
    recipe = {"architecture": ARCH, "model_args": MODEL_ARGS, "pretrain_tasks": PRETRAIN_TASKS,
              "held_out_tasks": HELD_OUT, "steps": steps, "batch_size": batch, "lr": lr, "seed": seed,
              "optimizer": "AdamW wd 0.05, cosine, 5% warmup, label smoothing 0.1, grad clip 1.0",
              "augmentation": "random shift <=3 px (reflect pad), h-flip for fashion/clipart",
              "wall_s": round(time.time() - t0)}
    (out / f"{SHIPPED}.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(json.dumps(recipe), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=700)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ASSETS)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--card", action="store_true", help="measure linear probes and write the model card")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.card:
        from jobs.model_card import write_card
        write_card(args.out)
    else:
        pretrain(args.steps, args.batch_size, args.lr, args.seed, args.out)


if __name__ == "__main__":
    main()
