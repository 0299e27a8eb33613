import json

import pytest
import torch
from safetensors.torch import save_file

from petl_platform import SHIPPED, PetlError, create_backbone, fingerprint
from petl_platform.backbones.factory import ASSETS

TINY = dict(img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=2)


def test_fingerprint_same_weights_same_hash(tiny_backbone):
    torch.manual_seed(0)
    again = create_backbone("vit_tiny_patch16_224", **TINY)
    assert again.fingerprint == tiny_backbone.fingerprint == fingerprint(tiny_backbone)


def test_fingerprint_changes_with_one_weight(tiny_backbone):
    torch.manual_seed(0)
    other = create_backbone("vit_tiny_patch16_224", **TINY)
    with torch.no_grad():
        other.blocks[2].mlp.fc1.weight[3, 5] += 1e-3
    assert fingerprint(other) != tiny_backbone.fingerprint


def test_fingerprint_changes_with_config():
    torch.manual_seed(0)
    a = create_backbone("vit_tiny_patch16_224", **TINY)
    torch.manual_seed(0)
    b = create_backbone("vit_tiny_patch16_224", **{**TINY, "global_pool": "avg"})
    assert a.fingerprint != b.fingerprint


def test_backbone_is_frozen_and_overrides_pass_through(tiny_backbone):
    assert len(tiny_backbone.blocks) == 4 and tiny_backbone.embed_dim == 64
    assert tiny_backbone.patch_embed.grid_size == (8, 8)
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    assert tiny_backbone(torch.randn(2, 3, 32, 32)).shape == (2, 64)  # no classifier


def test_local_weights_file_roundtrip(tmp_path, tiny_backbone):
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.state_dict().items()}, str(path))
    (tmp_path / "w.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": TINY}))
    loaded = create_backbone(str(path))
    assert loaded.fingerprint == tiny_backbone.fingerprint
    pth = tmp_path / "w.pth"
    torch.save(tiny_backbone.state_dict(), pth)
    assert create_backbone(f"vit_tiny_patch16_224@{pth}", **TINY).fingerprint == tiny_backbone.fingerprint


def test_bad_backbones_give_clear_errors(tmp_path):
    with pytest.raises(PetlError, match="unknown backbone 'vit_nonexistent'"):
        create_backbone("vit_nonexistent")
    with pytest.raises(PetlError, match="does not exist"):
        create_backbone(str(tmp_path / "missing.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    (tmp_path / "bad.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "model_args": TINY}))
    with pytest.raises(PetlError, match="cannot read weights file"):
        create_backbone(str(bad))
    with pytest.raises(PetlError, match="no architecture"):
        (tmp_path / "x").mkdir()
        torch.save({}, tmp_path / "x" / "w.pth")
        create_backbone(str(tmp_path / "x" / "w.pth"))
    with pytest.raises(PetlError, match="not a timm VisionTransformer"):
        create_backbone("resnet18")


def test_shipped_backbone_and_model_card():
    weights = ASSETS / f"{SHIPPED}.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    card = (ASSETS / f"{SHIPPED}.md").read_text()
    assert "Linear-probe accuracy" in card and "Recipe" in card
    bb = create_backbone(SHIPPED)
    assert len(bb.blocks) == 12 and bb.patch_embed.img_size == (32, 32)
    assert bb.fingerprint == create_backbone(SHIPPED).fingerprint


def test_timm_name_without_weights_warns_once(caplog, monkeypatch, tmp_path, tiny_backbone):
    from petl_platform.backbones import factory

    monkeypatch.setattr(factory, "_WARNED", set())
    path = tmp_path / "w.pth"
    torch.save(tiny_backbone.state_dict(), path)
    with caplog.at_level("WARNING", logger=factory.__name__):
        create_backbone("vit_tiny_patch16_224", **TINY)
        create_backbone("vit_tiny_patch16_224", **TINY)  # once per name and process
        create_backbone(f"vit_tiny_patch16_224@{path}", **TINY)  # weights given: no warning
        create_backbone(SHIPPED)
    msgs = [r.getMessage() for r in caplog.records if r.name == factory.__name__]
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith("vit_tiny_patch16_224 has no pretrained weights here") and "random" in msgs[0]
    assert "ARCH@FILE" in msgs[0]
