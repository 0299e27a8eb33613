"""One row per registered method: every method gets the same behavioural checks on tiny ViTs.

A new method joins automatically through ``list_methods()``. If it needs small hyperparameters on
the tiny backbones, add them to ``TINY_HPARAMS``; if it reproduces the frozen backbone at init, add
it to ``IDENTITY_AT_INIT``. Inside ``model.vit`` a trainable tensor must live in an
``AdapterModule``; outside it (``head``, exit heads, modules shared by all layers) every tensor is
the method's own by construction; backbone tensors never train.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from petl_platform import PetlError, build_model, get_method, list_methods, load_adapter, save_adapter
from petl_platform.methods import AdapterModule

NUM_CLASSES = 5
TINY_HPARAMS: dict[str, dict] = {
    "arc": {"rank": 8},
    "arc_att": {"rank": 8},
    "dtl": {"m": 3},
    "dtl_plus": {"m": 3},
}
IDENTITY_AT_INIT = {"linear", "lora", "adapter", "repadapter", "arc", "arc_att"}

METHODS = list_methods()
MERGEABLE = [m for m in METHODS if get_method(m).mergeable]
NOT_MERGEABLE = [m for m in METHODS if not get_method(m).mergeable]


def make(method: str, backbone, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(method, backbone, NUM_CLASSES, **TINY_HPARAMS.get(method, {}))


def perturb(model, seed: int = 0) -> None:
    """Move every trainable tensor off its (often zero) init so equalities are not trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.is_floating_point():
                p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def backbone_ptrs(backbone) -> set[int]:
    return {t.data_ptr() for t in list(backbone.parameters()) + list(backbone.buffers())}


def adapter_prefixes(model) -> list[str]:
    return [f"{n}." for n, m in model.named_modules() if isinstance(m, AdapterModule)]


@pytest.mark.parametrize("method", METHODS)
def test_forward_backward_shapes(method, tiny_backbone8, images):
    model = make(method, tiny_backbone8).train()
    y = torch.arange(images.shape[0]) % NUM_CLASSES
    out = model.training_step(images, y, 0.5)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert out.logits.shape == (images.shape[0], NUM_CLASSES)
    out.loss.backward()
    model.after_backward()
    assert model.head.weight.grad is not None and model.head.weight.grad.abs().sum() > 0
    if model.num_trainable() > 0:
        grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head.")]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), "no method parameter received a gradient"
    assert all(p.grad is None for p in tiny_backbone8.parameters()), "a frozen backbone tensor got a gradient"
    assert model.eval()(images).shape == (images.shape[0], NUM_CLASSES)


@pytest.mark.parametrize("method", METHODS)
def test_only_intended_params_trainable(method, tiny_backbone8):
    model = make(method, tiny_backbone8)
    frozen = backbone_ptrs(tiny_backbone8)
    assert not any(p.requires_grad for p in tiny_backbone8.parameters())
    injected = tuple(adapter_prefixes(model))
    for name, p in model.named_parameters():
        if p.data_ptr() in frozen:
            assert not p.requires_grad, f"backbone tensor {name} requires grad"
        else:
            assert p.requires_grad, f"new tensor {name} is not trainable"
            assert not name.startswith("vit.") or name.startswith(injected), \
                f"trainable {name} lies in the ViT tree but outside any AdapterModule"
    assert model.head.weight.requires_grad
    assert model.num_trainable() == sum(p.numel() for n, p in model.named_parameters()
                                        if p.requires_grad and not n.startswith("head."))


@pytest.mark.parametrize("method", METHODS)
def test_no_module_injected_into_patch_embed(method, tiny_backbone8):
    model = make(method, tiny_backbone8)
    injected = [n for n, m in model.named_modules() if isinstance(m, AdapterModule)]
    assert not any("patch_embed" in n for n in injected), injected
    assert not any(isinstance(m, AdapterModule) for m in model.vit.patch_embed.modules())


@pytest.mark.parametrize("method", METHODS)
def test_save_load_round_trip(method, tiny_backbone8, images, tmp_path):
    model = make(method, tiny_backbone8)
    perturb(model)
    model.eval()
    save_adapter(model, tmp_path, task="t", classes=[str(i) for i in range(NUM_CLASSES)])
    loaded = load_adapter(tmp_path, tiny_backbone8)
    assert loaded.method == method and loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=1e-6)

    saved = load_file(str(tmp_path / "adapter.safetensors"))
    assert set(saved) == set(model.trainable_state_dict())
    frozen_names = {n for n, t in model.state_dict().items() if t.data_ptr() in backbone_ptrs(tiny_backbone8)}
    assert not set(saved) & frozen_names
    for key, t in saved.items():  # no backbone tensor under another name either
        for b in tiny_backbone8.state_dict().values():
            assert not (b.shape == t.shape and torch.equal(b, t)), f"{key} duplicates a backbone tensor"


@pytest.mark.parametrize("method", MERGEABLE)
def test_merged_equals_unmerged(method, tiny_backbone8, images):
    before = {k: v.clone() for k, v in tiny_backbone8.state_dict().items()}
    model = make(method, tiny_backbone8)
    perturb(model)
    model.eval()
    merged = model.merged().eval()
    assert not any(isinstance(m, AdapterModule) for m in merged.modules())
    with torch.no_grad():
        torch.testing.assert_close(merged(images), model(images), rtol=0, atol=1e-5)
    for k, v in tiny_backbone8.state_dict().items():  # folding never writes into the shared tensors
        assert torch.equal(v, before[k]), f"merge modified frozen backbone tensor {k}"


@pytest.mark.parametrize("method", NOT_MERGEABLE)
def test_not_mergeable_raises(method, tiny_backbone8):
    with pytest.raises(PetlError, match="not mergeable"):
        make(method, tiny_backbone8).merged()


@pytest.mark.parametrize("method", sorted(IDENTITY_AT_INIT & set(METHODS)))
def test_identity_at_init(method, tiny_backbone8, images):
    model = make(method, tiny_backbone8).eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), tiny_backbone8.forward_features(images),
                                   rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_load_refuses_other_backbone(method, tiny_backbone8, tiny_backbone, tmp_path):
    save_adapter(make(method, tiny_backbone8), tmp_path)
    assert tiny_backbone.fingerprint != tiny_backbone8.fingerprint
    with pytest.raises(PetlError) as err:
        load_adapter(tmp_path, tiny_backbone)
    assert tiny_backbone8.fingerprint in str(err.value) and tiny_backbone.fingerprint in str(err.value)


@pytest.mark.parametrize("method", METHODS)
def test_truncated_weights_raise(method, tiny_backbone8, tmp_path):
    save_adapter(make(method, tiny_backbone8), tmp_path)
    weights = tmp_path / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(PetlError, match="truncated|cannot read"):
        load_adapter(tmp_path, tiny_backbone8)
