import json

import numpy as np
import pytest
from PIL import Image

from petl_platform.data import get_task, list_tasks, make_transform, task_tensors
from petl_platform.data import registry, sources, synthetic
from petl_platform.errors import PetlError


def test_registry_has_required_tasks():
    names = list_tasks(include_variants=False)
    for n in ("fashion_mnist", "clipart", "letters", "digits"):
        assert n in names
    structured = [n for n in names if n.startswith(("dsprites", "norb", "clevr"))]
    assert len(structured) >= 2 and len(names) >= 6
    assert all(n + "-1k" in list_tasks() for n in names)


@pytest.mark.parametrize("name", ["digits", "dsprites_loc", "norb_azimuth", "clevr_count"])
def test_task_splits_sizes_and_labels(name):
    t = get_task(name)
    sizes = t.sizes()
    assert all(sizes[s] > 0 for s in ("train", "val", "test"))
    for split, (x, y) in t.splits.items():
        assert x.dtype == np.uint8 and len(x) == len(y)
        assert y.min() >= 0 and y.max() < len(t.classes)
    assert len(np.unique(t.splits["train"][1])) == len(t.classes)


def test_vtab1k_variant_sizes():
    t = get_task("dsprites_loc-1k")
    assert t.sizes() == {"train": 800, "val": 200, "test": 2000}
    assert get_task("digits-1k").sizes()["train"] == 800


def test_fashion_mnist_from_debian_package():
    t = get_task("fashion_mnist")
    assert t.sizes() == {"train": 55000, "val": 5000, "test": 10000}
    assert t.classes[9] == "ankle boot"


def test_generators_are_deterministic():
    for fn in (synthetic.dsprites_location, synthetic.norb_azimuth, synthetic.clevr_count):
        a, la = fn(20, 3)
        b, lb = fn(20, 3)
        c, _ = fn(20, 4)
        assert np.array_equal(a, b) and np.array_equal(la, lb)
        assert not np.array_equal(a, c)


def test_splits_are_deterministic_and_disjoint():
    images = np.arange(300)[:, None].repeat(4, 1)
    labels = np.arange(300) % 3
    s1 = registry.split_random(images, labels, seed=5)
    s2 = registry.split_random(images, labels, seed=5)
    assert all(np.array_equal(s1[k][1], s2[k][1]) for k in s1)
    ids = [set(map(tuple, s1[k][0])) for k in ("train", "val", "test")]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])


def test_letters_split_by_font():
    images, labels, classes, fonts = sources.letters(variants=1)
    assert len(classes) == 26 and len(np.unique(fonts)) >= 6
    tagged = images.reshape(len(images), -1)[:, :1] * 0 + fonts[:, None]  # carry the font id through the split
    parts = registry.split_by_group(tagged, labels, fonts, seed=0)
    font_sets = [set(parts[s][0][:, 0].tolist()) for s in ("train", "val", "test")]
    assert all(font_sets)
    assert not (font_sets[0] & font_sets[1] or font_sets[0] & font_sets[2] or font_sets[1] & font_sets[2])


def _write_tree(root, splits=("train", "test"), n=4):
    for split in splits:
        for c, color in (("cat", 40), ("dog", 200)):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (20, 20), (color, i * 10, 0)).save(d / f"{i}.png")


def test_folder_task(tmp_path):
    _write_tree(tmp_path, n=10)
    t = get_task(f"folder:{tmp_path}")
    assert t.classes == ["cat", "dog"]
    sizes = t.sizes()
    assert sizes["test"] == 20 and sizes["train"] + sizes["val"] == 20 and sizes["val"] >= 1


def test_folder_task_is_read_again_once_its_files_change(tmp_path):
    """A long-lived process (a `petl train` trainer) keeps a task it has read, but not past a change
    to the folder: a new image is in the next get_task, and the built-in tasks have no stamp."""
    _write_tree(tmp_path, n=10)
    name = f"folder:{tmp_path}"
    first = get_task(name)
    assert get_task(name) is first and registry.task_stamp(name) == registry.task_stamp(name)
    stamp = registry.task_stamp(name)
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "test" / "cat" / "new.png")
    assert registry.task_stamp(name) != stamp
    again = get_task(name)
    assert again is not first and again.sizes()["test"] == first.sizes()["test"] + 1
    assert registry.task_stamp("digits-1k") == ""


def test_folder_task_errors(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "cat").mkdir(parents=True)
    with pytest.raises(PetlError, match="no images"):
        get_task(f"folder:{tmp_path}")
    with pytest.raises(PetlError, match="needs train"):
        get_task(f"folder:{tmp_path / 'missing'}")


def test_unknown_task_lists_valid_choices():
    with pytest.raises(PetlError, match="valid tasks: .*digits"):
        get_task("imagenet")


def test_shared_transform_path(tiny_backbone):
    x, y = task_tensors(get_task("dsprites_loc-1k"), tiny_backbone)["val"]
    assert x.shape == (200, 3, 32, 32) and y.shape == (200,)
    tf = make_transform(tiny_backbone)
    assert "Normalize" in repr(tf)


def test_cli_tasks_json(capsys):
    from petl_platform.cli import main

    assert main(["tasks", "digits", "clevr_count-1k", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["digits", "clevr_count-1k"]
    assert set(rows[0]) >= {"name", "classes", "sizes", "source"}
    assert rows[1]["sizes"]["train"] == 800


def test_a_trial_process_keeps_a_task_until_its_files_change(tmp_path, tiny_backbone, monkeypatch):
    """``training.trial.loaded``, which a trainer keeps across jobs: the same task and backbone
    reuse the loaded tensors; a new image in the folder gives the next job the new data."""
    import petl_platform.backbones as backbones
    from petl_platform.training import trial

    monkeypatch.setattr(backbones, "create_backbone", lambda name: tiny_backbone)
    monkeypatch.setattr(trial, "_LOADED", {})
    _write_tree(tmp_path, n=10)
    name = f"folder:{tmp_path}"
    first = trial.loaded(name, "tiny")
    assert trial.loaded(name, "tiny") is first
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "test" / "dog" / "new.png")
    again = trial.loaded(name, "tiny")
    assert again is not first and len(again[2]["test"][1]) == len(first[2]["test"][1]) + 1
