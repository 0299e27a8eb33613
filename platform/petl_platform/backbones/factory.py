"""Frozen timm ViT backbones: by timm name, from a local weights file, or the shipped offline ViT.

``create_backbone`` always returns a timm ``VisionTransformer`` with no classifier, every tensor
frozen, in eval mode, tagged with ``petl_name`` and a content ``fingerprint`` (hash of weights +
structural config) that adapters carry so a mismatched backbone is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import timm
import torch
from torch import nn

from ..errors import PetlError

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
SHIPPED = "petl_vit_t12_p4_32"  # the offline-pretrained 12-block ViT that ships with the package
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz")


def shipped_config() -> dict:
    return json.loads((ASSETS / f"{SHIPPED}.json").read_text())


def _build(architecture: str, model_args: dict, pretrained: bool = False) -> nn.Module:
    if not timm.is_model(architecture):
        vits = ", ".join(timm.list_models("vit_*")[:8])
        raise PetlError(f"unknown backbone {architecture!r}: not a timm model name or a weights file "
                        f"(timm ViTs include {vits}, ...; or use {SHIPPED})")
    args = {k: v for k, v in model_args.items() if k != "num_classes"}
    try:
        model = timm.create_model(architecture, pretrained=pretrained, num_classes=0, **args)
    except TypeError as e:
        raise PetlError(f"bad override for backbone {architecture!r}: {e}") from None
    except RuntimeError as e:  # e.g. pretrained weights unavailable offline
        raise PetlError(f"cannot create backbone {architecture!r} (pretrained={pretrained}): {e}") from None
    if not (hasattr(model, "blocks") and hasattr(model, "patch_embed") and hasattr(model, "_pos_embed")):
        raise PetlError(f"backbone {architecture!r} is not a timm VisionTransformer; PETL methods need a ViT")
    return model


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    except Exception as e:  # corrupt/truncated files raise many different exception types
        raise PetlError(f"cannot read weights file {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PetlError(f"weights file {path} does not hold a state dict of tensors")
    return state


def _apply_weights(model: nn.Module, state: dict, source) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.head"))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise PetlError(f"weights in {source} do not fit the backbone: {str(e).splitlines()[1][:200]}") from None
    if missing or unexpected:
        raise PetlError(f"weights in {source} do not fit the backbone: missing {missing[:3]}, unexpected {unexpected[:3]}")


def _load_npz(model: nn.Module, path: Path) -> None:
    """An original JAX/Flax ``.npz`` checkpoint (Google's ``ViT-B_16.npz``, timm's ``augreg``
    files) through timm's own converter, ``VisionTransformer.load_pretrained``. A classifier or
    pre-logits layer in the file is ignored (the backbone has none)."""
    try:
        with torch.no_grad():
            model.load_pretrained(str(path))
    except KeyError as e:
        raise PetlError(f"weights in {path} do not fit the backbone: .npz has no {e}") from None
    except Exception as e:  # noqa: BLE001 - numpy/zip/shape errors of many kinds
        raise PetlError(f"cannot load .npz weights {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None


def _config_for_file(path: Path, arch: str | None) -> dict:
    """Architecture of a weights file: ``arch@path`` or a JSON beside it (timm hub style)."""
    if arch:
        return {"architecture": arch, "model_args": {}}
    for cand in (path.with_suffix(".json"), path.parent / "config.json"):
        if cand.exists():
            cfg = json.loads(cand.read_text())
            return {"architecture": cfg["architecture"], "model_args": cfg.get("model_args", {})}
    raise PetlError(f"no architecture for {path}: put a timm-style config.json beside it "
                    f"or write ARCH@{path} (e.g. vit_base_patch16_224@{path})")


def create_backbone(name_or_path: str = SHIPPED, pretrained: bool = False, **overrides) -> nn.Module:
    """Create a frozen ViT backbone.

    ``name_or_path``: the shipped ``petl_vit_t12_p4_32``; any timm ViT name (``pretrained=True``
    downloads when the user has network); a local ``.safetensors``/``.pth`` file or directory with
    a ``config.json``; or ``ARCH@FILE`` (FILE may also be a JAX ``.npz``, e.g.
    ``vit_base_patch16_224.augreg_in21k@ViT-B_16.npz``). ``overrides`` pass through to ``timm.create_model``.
    """
    name_or_path = str(name_or_path)
    arch, _, file_part = name_or_path.rpartition("@") if "@" in name_or_path else (None, "", name_or_path)
    path = Path(os.path.expanduser(file_part))
    if name_or_path == SHIPPED:
        cfg = shipped_config()
        model = _build(cfg["architecture"], {**cfg["model_args"], **overrides})
        _apply_weights(model, load_weights_file(ASSETS / f"{SHIPPED}.safetensors"), SHIPPED)
    elif path.suffix in WEIGHT_SUFFIXES or path.is_dir() or arch:
        if path.is_dir():
            path = next((path / f for f in ("model.safetensors", "pytorch_model.bin") if (path / f).exists()), path / "model.safetensors")
        if not path.exists():
            raise PetlError(f"weights file {path} does not exist")
        cfg = _config_for_file(path, arch)
        model = _build(cfg["architecture"], {**cfg["model_args"], **overrides})
        if path.suffix == ".npz":
            _load_npz(model, path)
        else:
            _apply_weights(model, load_weights_file(path), path)
    else:
        model = _build(name_or_path, overrides, pretrained=pretrained)
        if not pretrained:
            _warn_random(name_or_path)
    model.requires_grad_(False)
    model.eval()
    model.petl_name = name_or_path
    model.fingerprint = fingerprint(model)
    return model


_WARNED: set[str] = set()


def _warn_random(name: str) -> None:
    """A bare timm name is built with random weights (nothing is downloaded at run time): say so,
    once per name and process, since every accuracy on such a backbone is meaningless."""
    if name not in _WARNED:
        _WARNED.add(name)
        log.warning("%s has no pretrained weights here (nothing is downloaded at run time): its weights are "
                    "random. Pass a weights file as ARCH@FILE (e.g. %s@weights.safetensors, or a JAX .npz) or use the "
                    "shipped %s", name, name, SHIPPED)


def structural_config(model: nn.Module) -> dict:
    """What determines the features besides the weights: geometry, pooling and preprocessing."""
    pe = model.patch_embed
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return {
        "class": type(model).__name__, "img_size": list(pe.img_size), "patch_size": list(pe.patch_size),
        "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": model.blocks[0].attn.num_heads,
        "global_pool": model.global_pool, "num_prefix_tokens": model.num_prefix_tokens,
        "mean": list(cfg.get("mean", [])), "std": list(cfg.get("std", [])),
    }


def fingerprint(model: nn.Module) -> str:
    """sha256 over the structural config and every tensor (name, dtype, shape, bytes); 16 hex chars."""
    h = hashlib.sha256(json.dumps(structural_config(model), sort_keys=True).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]
