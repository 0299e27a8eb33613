"""The light decode path (``imaging``): ``Geometry``, Pillow alone, gives the same pixels as the
torchvision transform it was built from, and a process that imports it (``petl predict``'s decode
tasks) never imports torch."""

import io
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from petl_platform.data import Pixels
from petl_platform.data.transforms import light_geometry
from petl_platform.imaging import CenterCrop, Geometry, Resize


def _images():
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (40, 28), (28, 40), (17, 9), (224, 224), (300, 200), (199, 331), (8, 8), (33, 32)]
    out = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    out.append(Image.fromarray(rng.integers(0, 255, (50, 70), dtype=np.uint8), "L"))  # grayscale
    out.append(Image.fromarray(rng.integers(0, 255, (45, 61, 4), dtype=np.uint8), "RGBA"))
    return out


TRANSFORMS = {
    "shipped (timm eval, crop_pct 1)": [T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32)],
    "224, crop_pct 0.875, bilinear": [T.Resize(256, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(224)],
    "tuple resize, nearest": [T.Resize((24, 40), interpolation=T.InterpolationMode.NEAREST), T.CenterCrop((20, 36))],
    "crop larger than the image (padded)": [T.Resize(16), T.CenterCrop((24, 20))],
    "max_size": [T.Resize(30, max_size=40, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(30)],
    "crop only": [T.CenterCrop(31)],
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_geometry_equals_torchvision_pixel_for_pixel(name):
    ops = TRANSFORMS[name]
    crop = ops[-1].size
    geo = light_geometry(ops, tuple(crop))
    assert geo is not None and len(geo.ops) == len(ops)
    ref = T.Compose(ops)
    for im in _images():
        want = np.asarray(ref(im.convert("RGB")), dtype=np.uint8).transpose(2, 0, 1)
        got = geo.to_uint8(im)
        assert got.dtype == np.uint8 and got.shape == want.shape, (name, im.size)
        assert np.array_equal(got, want), (name, im.size, int(np.abs(got.astype(int) - want).max()))


def test_pixels_uses_the_light_geometry_and_still_equals_the_transform(tiny_backbone8):
    from petl_platform.data import make_transform

    tf = make_transform(tiny_backbone8)
    px = Pixels(tf, tuple(tiny_backbone8.patch_embed.img_size))
    assert isinstance(px.light, Geometry)
    assert [type(op) for op in px.light.ops] == [Resize, CenterCrop]
    for im in _images():
        assert torch.equal(px.normalize(px.to_uint8(im)[None])[0], tf(im.convert("RGB")))


def test_an_op_the_light_path_does_not_model_falls_back_to_torchvision():
    ops = [T.Resize(20), T.Grayscale(num_output_channels=3), T.CenterCrop(16)]
    assert light_geometry(ops, (16, 16)) is None
    px = Pixels(T.Compose([*ops, T.ToTensor()]), (16, 16))
    assert px.light is None
    im = _images()[5]
    assert torch.equal(px.to_uint8(im), torch.from_numpy(np.asarray(T.Compose(ops)(im)).transpose(2, 0, 1).copy()))


def test_decode_path_imports_no_torch():
    """What a decode task's worker imports: the decode stage, and a Geometry unpickled."""
    geo = pickle.dumps(light_geometry(TRANSFORMS["shipped (timm eval, crop_pct 1)"], (32, 32)))
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(buf, format="PNG")
    code = (
        "import pickle, sys\n"
        "from petl_platform.cluster.decode import decode_batch\n"
        f"geo = pickle.loads({geo!r})\n"
        f"got = decode_batch({{'path': ['a', 'b'], 'bytes': [{buf.getvalue()!r}, b'junk']}}, geo)\n"
        "assert got['pixels'].shape == (2, 3, 32, 32) and got['pixels'][0, 1].min() == 200, got['pixels'][0, 1]\n"
        "assert got['error'][0] is None and 'not a readable image' in got['error'][1]\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'mlflow', 'ray') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "heavy: []" in r.stdout, r.stdout


def test_package_names_still_resolve_lazily():
    r = subprocess.run([sys.executable, "-c", (
        "import sys, petl_platform as p\n"
        "assert 'torch' not in sys.modules\n"
        "from petl_platform import build_model, SHIPPED, PetlError, __version__\n"
        "assert p.methods.get_method and callable(build_model) and SHIPPED and __version__\n"
        "try:\n    p.no_such_thing\nexcept AttributeError as e:\n    print('ok', e)\n")],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok module 'petl_platform' has no attribute 'no_such_thing'" in r.stdout
