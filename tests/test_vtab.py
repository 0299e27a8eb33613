"""VTAB-1k in the PETL repos' layout, on a tiny fake tree generated here (no real data, no GPU):
loading, split sizes, labels, one-line errors, `petl tasks --vtab-root`, both suite averages,
a JAX .npz backbone round trip, and (slow) the whole protocol on Ray with MLflow."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from petl_platform.cli import main
from petl_platform.data import check_task_name, get_task, task_tensors, to_tensors
from petl_platform.data.registry import task_slug
from petl_platform.data.vtab import (VTAB_DATASETS, VTAB_GROUPS, LazyImages, discover, parse_name,
                                     suite_average)
from petl_platform.errors import PetlError

# dataset -> labels used (a few classes each), from all three groups
FAKE = {"cifar": 3, "dtd": 2, "eurosat": 3, "clevr_count": 2}
N = {"train800": 6, "val200": 3, "test": 5}


def make_vtab_tree(root, datasets=FAKE, size=24):
    """ROOT/<dataset>/images/<split>_<i>.png + the four list files, as the PETL repos lay it out."""
    for ds, n_cls in datasets.items():
        d = root / ds
        (d / "images").mkdir(parents=True)
        lists = {}
        for split, n in N.items():
            rows = []
            for i in range(n):
                label = i % n_cls
                rel = f"images/{split}_{i}.png"
                rgb = (40 + 80 * label, (i * 37) % 255, 10 * len(ds))
                Image.new("RGB", (size, size + i), rgb).save(d / rel)  # not square: the loader resizes
                rows.append(f"{rel} {label}")
            lists[split] = rows
        lists["train800val200"] = lists["train800"] + lists["val200"]
        for split, rows in lists.items():
            (d / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def tree(tmp_path):
    return make_vtab_tree(tmp_path / "vtab-1k")


def _one_line_error(fn, match):
    with pytest.raises(PetlError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_groups_are_the_19_standard_datasets():
    assert [len(v) for v in VTAB_GROUPS.values()] == [7, 4, 8] and len(set(VTAB_DATASETS)) == 19


def test_load_search_and_final_views(tree):
    t = get_task(f"vtab:{tree}/cifar")
    assert t.sizes() == {"train": 6, "val": 3, "test": 5}
    assert len(t.classes) == 100  # the VTAB class count, not the labels present
    x, y = t.splits["train"]
    assert x.shape == (6, 224, 224, 3) and x.dtype == np.uint8  # stored at ViT-B's 224 px
    assert y.tolist() == [0, 1, 2, 0, 1, 2]
    assert isinstance(t.splits["test"][0], LazyImages) and t.splits["test"][1].tolist() == [0, 1, 2, 0, 1]
    # the decoded pixel colour encodes the label: the rows line up with the list file
    assert x[1, 100, 100, 0] == 120 and t.splits["test"][0][2][5, 5, 0] == 200
    final = get_task(f"vtab:{tree}/cifar?final")
    assert final.sizes() == {"train": 9, "val": 3, "test": 5}
    assert np.array_equal(final.splits["train"][0][6:], t.splits["val"][0])
    assert "train800val200" in final.source and "natural" in final.source


def test_lazy_test_split_through_the_backbone_transform(tree, tiny_backbone):
    t = get_task(f"vtab:{tree}/eurosat")
    tensors = task_tensors(t, tiny_backbone)
    x, y = tensors["test"]
    assert getattr(x, "lazy", False) and len(x) == 5 and x.shape == (5, 3, 32, 32)
    from petl_platform.data import make_transform
    eager, _ = to_tensors(t.splits["test"][0][0:5], y.numpy(), make_transform(tiny_backbone))
    assert torch.equal(x[1:4], eager[1:4]) and torch.equal(x[torch.tensor([4, 0])], eager[[4, 0]])
    assert tensors["train"][0].shape == (6, 3, 32, 32)  # train/val eager


def test_finetune_evaluates_a_lazy_test_split(tree, tiny_backbone):
    from petl_platform.training.run import finetune

    _, r = finetune(f"vtab:{tree}/clevr_count?final", "linear", "", backbone_model=tiny_backbone,
                    train_overrides={"epochs": 1, "batch_size": 4, "progress": False})
    assert 0.0 <= r["accuracy"] <= 1.0 and r["accuracy"] * 5 == pytest.approx(round(r["accuracy"] * 5))


def test_names_and_slugs(tree):
    assert parse_name(f"vtab:{tree}/dtd?final") == (tree, "dtd", True)
    assert task_slug(f"vtab:{tree}/dtd") == "vtab-dtd" and task_slug(f"vtab:{tree}/dtd?final") == "vtab-dtd-final"
    assert task_slug("folder:/data/my tree/") == "folder-my_tree" and task_slug("digits-1k") == "digits-1k"
    _one_line_error(lambda: parse_name(f"vtab:{tree}/dtd?best"), "unknown VTAB option")
    _one_line_error(lambda: check_task_name("vtab:"), "needs a dataset folder")
    _one_line_error(lambda: check_task_name(f"vtab:{tree}/svhn"), "does not exist")
    check_task_name(f"vtab:{tree}/dtd?final")


def test_errors_are_one_line(tree):
    d = tree / "cifar"
    (d / "val200.txt").write_text("images/val200_0.png 0\nimages/val200_1.png\n")
    msg = _one_line_error(lambda: get_task(f"vtab:{tree}/cifar"), "val200.txt:2: expected 'relative/path.jpg LABEL'")
    assert str(d) in msg
    (d / "val200.txt").write_text("images/val200_0.png 100\n")
    _one_line_error(lambda: check_task_name(f"vtab:{tree}/cifar"), r"val200.txt:1: label 100 out of range 0..99")
    (d / "val200.txt").unlink()
    _one_line_error(lambda: check_task_name(f"vtab:{tree}/cifar"), "has no val200.txt")

    (tree / "dtd" / "images" / "train800_2.png").unlink()
    _one_line_error(lambda: get_task(f"vtab:{tree}/dtd"), "train800_2.png does not exist")
    (tree / "eurosat" / "images" / "test_3.png").unlink()  # test images are checked at load, read lazily
    _one_line_error(lambda: get_task(f"vtab:{tree}/eurosat"), r"test_3.png listed in .*test.txt does not exist \(1 of 5")
    (tree / "clevr_count" / "images" / "val200_1.png").write_bytes(b"not a png")
    _one_line_error(lambda: get_task(f"vtab:{tree}/clevr_count"), "cannot read image .*val200_1.png")


@pytest.mark.parametrize("listed", ["../../x.png", "/etc/hostname", "images/../../cifar/images/test_0.png",
                                    "..\\..\\x.png"])
def test_list_paths_may_not_leave_the_dataset_folder(tree, listed):
    outside = tree.parent / "x.png"
    Image.new("RGB", (24, 24)).save(outside)  # a real image: the loader must refuse the path, not fail on it
    d = tree / "dtd"
    (d / "train800.txt").write_text(f"images/train800_0.png 0\n{listed} 1\n")
    for load in (lambda: check_task_name(f"vtab:{tree}/dtd"), lambda: get_task(f"vtab:{tree}/dtd"),
                 lambda: discover(tree)):
        _one_line_error(load, r"train800.txt:2: image path .* leaves the dataset folder")


def test_cli_tasks_vtab_root(tree, capsys):
    (tree / "notes").mkdir()  # a folder without list files is not a dataset
    assert main(["tasks", "--vtab-root", str(tree)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in out[1:-1]] == ["cifar", "dtd", "eurosat", "clevr_count"]  # VTAB order
    assert out[1].split()[:7] == ["cifar", "natural", "100", "6", "3", "9", "5"]
    assert out[3].split()[:3] == ["eurosat", "specialized", "10"] and out[4].split()[1] == "structured"
    assert out[-1] == "4 of 19 VTAB-1k datasets present"
    assert main(["tasks", "--vtab-root", str(tree), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[2]["task"] == f"vtab:{tree}/eurosat" and rows[2]["sizes"]["train800val200"] == 9
    assert main(["tasks", f"vtab:{tree}/dtd?final", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)[0]
    assert info["num_classes"] == 47 and info["sizes"] == {"train": 9, "val": 3, "test": 5}


def test_cli_errors_exit_2(tree, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PETL_HOME", str(tmp_path / "home"))
    (tree / "dtd" / "test.txt").write_text("images/test_0.png zero\n")
    cases = [(["tasks", "--vtab-root", str(tmp_path / "nowhere")], "VTAB root .* does not exist"),
             (["tasks", "--vtab-root", str(tmp_path)], "no VTAB-1k datasets under"),
             (["tasks", "--vtab-root", str(tree)], "test.txt:1: expected"),
             (["tasks", f"vtab:{tree}/dtd"], "test.txt:1: expected"),
             (["sweep", "--method", "linear"], "needs --task"),
             (["sweep", "--suite", "vtab1k", "--method", "linear"], "needs --vtab-root"),
             (["sweep", "--task", "digits-1k", "--vtab-root", str(tree)], "go with --suite"),
             (["train", "--task", f"vtab:{tree}/svhn", "--local"], "svhn does not exist")]
    for argv, match in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("petl: error: "), err
        import re
        assert re.search(match, err), (argv, err)
    (tree / "dtd" / "test.txt").write_text("images/test_0.png 0\n")
    assert main(["sweep", "--suite", "vtab1k", "--vtab-root", str(tree), "--datasets", "cifar,svhn"]) == 2
    assert "--datasets svhn not found" in capsys.readouterr().err


def test_discover_sizes(tree):
    rows = discover(tree)
    assert [(r["name"], r["group"], r["num_classes"]) for r in rows] == [
        ("cifar", "natural", 100), ("dtd", "natural", 47), ("eurosat", "specialized", 10),
        ("clevr_count", "structured", 8)]
    assert rows[0]["sizes"] == {"train800": 6, "val200": 3, "train800val200": 9, "test": 5}


def test_suite_average_both_conventions():
    a = suite_average({"cifar": 0.5, "dtd": 0.7, "eurosat": 0.9, "clevr_count": 0.3, "kitti": 0.1,
                       "svhn": float("nan"), "mine": 1.0})
    assert a["mean_of_datasets"] == pytest.approx(0.5)  # (0.5 + 0.7 + 0.9 + 0.3 + 0.1) / 5
    assert a["group_means"] == pytest.approx({"natural": 0.6, "specialized": 0.9, "structured": 0.2})
    assert a["mean_of_group_means"] == pytest.approx(1.7 / 3)
    assert a["datasets"] == 5 and not a["complete"] and "svhn" in a["missing"] and len(a["missing"]) == 14
    assert a["ignored"] == ["mine"] and a["missing_groups"] == []
    full = {d: {"natural": 0.7, "specialized": 0.8, "structured": 0.6}[g] for g, ds in VTAB_GROUPS.items() for d in ds}
    f = suite_average(full)
    assert f["complete"] and f["datasets"] == 19 and f["missing"] == []
    assert f["mean_of_datasets"] == pytest.approx((7 * 0.7 + 4 * 0.8 + 8 * 0.6) / 19)  # 0.6789...
    assert f["mean_of_group_means"] == pytest.approx(0.7)
    only = suite_average({"eurosat": 0.4})
    assert only["missing_groups"] == ["natural", "structured"] and only["mean_of_group_means"] == pytest.approx(0.4)
    assert math.isnan(suite_average({})["mean_of_datasets"])


def _to_jax_npz(model, path):
    """A timm ViT's weights in the original JAX/Flax ``ViT-B_16.npz`` layout (timm reads it back)."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    dim, heads = model.embed_dim, model.blocks[0].attn.num_heads
    w = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "pre_logits/kernel": np.zeros((dim, dim), np.float32), "head/kernel": np.zeros((dim, 5), np.float32),
         "head/bias": np.zeros(5, np.float32)}  # in21k files carry these: ignored
    for i in range(len(model.blocks)):
        b, p = f"blocks.{i}.", f"Transformer/encoderblock_{i}/"
        w[p + "LayerNorm_0/scale"], w[p + "LayerNorm_0/bias"] = sd[b + "norm1.weight"], sd[b + "norm1.bias"]
        w[p + "LayerNorm_2/scale"], w[p + "LayerNorm_2/bias"] = sd[b + "norm2.weight"], sd[b + "norm2.bias"]
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"].reshape(3, dim, dim), sd[b + "attn.qkv.bias"].reshape(3, dim)
        for j, n in enumerate(("query", "key", "value")):
            w[p + f"MultiHeadDotProductAttention_1/{n}/kernel"] = qkv_w[j].T.reshape(dim, heads, dim // heads)
            w[p + f"MultiHeadDotProductAttention_1/{n}/bias"] = qkv_b[j].reshape(heads, dim // heads)
        w[p + "MultiHeadDotProductAttention_1/out/kernel"] = \
            sd[b + "attn.proj.weight"].reshape(dim, heads, dim // heads).transpose(1, 2, 0)
        w[p + "MultiHeadDotProductAttention_1/out/bias"] = sd[b + "attn.proj.bias"]
        for r in range(2):
            w[p + f"MlpBlock_3/Dense_{r}/kernel"] = sd[b + f"mlp.fc{r + 1}.weight"].T
            w[p + f"MlpBlock_3/Dense_{r}/bias"] = sd[b + f"mlp.fc{r + 1}.bias"]
    np.savez(path, **w)


def test_jax_npz_backbone_round_trip(tiny_backbone, tmp_path):
    from petl_platform import create_backbone
    from platform_stack import TINY

    _to_jax_npz(tiny_backbone, tmp_path / "ViT-T.npz")
    bb = create_backbone(f"vit_tiny_patch16_224.augreg_in21k@{tmp_path / 'ViT-T.npz'}", **TINY)
    for k, v in tiny_backbone.state_dict().items():
        assert torch.allclose(bb.state_dict()[k], v, atol=1e-6), k
    assert bb.fingerprint == create_backbone(f"vit_tiny_patch16_224.augreg_in21k@{tmp_path / 'ViT-T.npz'}",
                                             **TINY).fingerprint
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 truncated")
    _one_line_error(lambda: create_backbone(f"vit_tiny_patch16_224@{tmp_path / 'bad.npz'}", **TINY), "cannot load .npz")
    np.savez(tmp_path / "partial.npz", **{"embedding/kernel": np.zeros((4, 4, 3, 64), np.float32)})
    _one_line_error(lambda: create_backbone(f"vit_tiny_patch16_224@{tmp_path / 'partial.npz'}", **TINY), "npz")


def test_jobs_vtab_maps_root_to_the_suite(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # jobs/ lives at the repo root
    from jobs.vtab import suite_argv

    assert suite_argv(["--root", "/d", "--method", "lora", "--root=/e"]) == [
        "sweep", "--suite", "vtab1k", "--vtab-root", "/d", "--method", "lora", "--vtab-root=/e"]


@pytest.mark.slow
def test_suite_end_to_end_on_ray_with_mlflow(tree, tmp_path, capsys):
    """Sweep (1 trial, 1 epoch) + final fit per dataset through the CLI, then read MLflow."""
    import mlflow
    import ray

    from platform_stack import platform_stack, s3_keys
    from petl_platform.cluster.connect import ensure_ray

    (tmp_path / "stack").mkdir()
    with platform_stack(tmp_path / "stack") as st:
        ensure_ray(num_cpus=2)
        try:
            rc = main(["sweep", "--suite", "vtab1k", "--vtab-root", str(tree), "--datasets", "cifar,dtd,eurosat",
                       "--method", "linear", "--backbone", st["backbone"], "--space", "lr=choice(0.02)",
                       "--samples", "1", "--epochs", "1", "--batch-size", "4", "--name", "vtab-e2e"])
        finally:
            ray.shutdown()
        out = capsys.readouterr().out
        assert rc == 0, out
        assert "| cifar | natural | 100 |" in out and "mean of group means (2 of 3 groups)" in out
        assert "mean of datasets (3 of 19)" in out and "missing (not averaged): caltech101" in out
        assert "registered models:/vtab1k-eurosat-linear version 1: first" in out  # challenger rule, first version
        c = mlflow.MlflowClient(st["settings"].tracking_uri)
        exp = c.get_experiment_by_name("petl")
        [suite] = c.search_runs([exp.experiment_id], "tags.`petl.role` = 'vtab_suite'")
        m = suite.data.metrics
        acc = {d: m[f"test_accuracy.{d}"] for d in ("cifar", "dtd", "eurosat")}
        assert all(0.0 <= v <= 1.0 for v in acc.values()) and {f"val_accuracy.{d}" for d in acc} <= set(m)
        assert m["mean_of_datasets"] == pytest.approx(sum(acc.values()) / 3)
        assert m["mean_of_group_means"] == pytest.approx(((acc["cifar"] + acc["dtd"]) / 2 + acc["eurosat"]) / 2)
        assert m["group_mean.natural"] == pytest.approx((acc["cifar"] + acc["dtd"]) / 2)
        assert suite.info.status == "FINISHED" and suite.data.tags["petl.vtab.complete"] == "false"
        children = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{suite.info.run_id}'")
        roles = sorted((r.data.tags.get("petl.role"), r.data.tags.get("petl.vtab.dataset")) for r in children)
        assert roles == sorted([(role, d) for d in acc for role in ("sweep", "vtab_final")])
        for r in children:
            if r.data.tags["petl.role"] == "vtab_final":
                assert r.data.metrics["test_accuracy"] == pytest.approx(acc[r.data.tags["petl.vtab.dataset"]])
                assert r.data.params["task"].endswith("?final") and r.info.status == "FINISHED"
        keys = [k for k in s3_keys(st["s3"], "mlflow/") if f"/{suite.info.run_id}/artifacts/vtab/" in k]
        assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["summary.json", "summary.md"]
        assert c.get_model_version_by_alias("vtab1k-eurosat-linear", "champion").run_id in {
            r.info.run_id for r in children}
        assert str(c.get_model_version_by_alias("vtab1k-eurosat-linear", "challenger").version) == "1"
