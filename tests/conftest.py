import os

import pytest
import torch

os.environ.setdefault("PETL_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache"))


@pytest.fixture(scope="session")
def tiny_backbone():
    """A tiny random ViT (the STYLE.md test config): depth 4, width 64, 32 px, patch 4."""
    from petl_platform import create_backbone

    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=4, embed_dim=64, num_heads=2)


@pytest.fixture(scope="session")
def tiny_backbone8():
    """Depth-8 variant for methods that need more blocks (DTL's M, 4 early-exit stages of 2)."""
    from petl_platform import create_backbone

    torch.manual_seed(0)
    return create_backbone("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=8, embed_dim=64, num_heads=2)


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.randn(4, 3, 32, 32)


@pytest.fixture(scope="module")
def one_thread():
    """The shared 2-core machine runs tiny models several times faster single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
