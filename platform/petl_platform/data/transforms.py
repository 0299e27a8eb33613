"""The one preprocessing path for training, evaluation and serving (timm's data config)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from timm.data import create_transform, resolve_model_data_config

from .. import imaging


def data_config(model) -> dict:
    """timm's data config for ``model`` at its actual input size, without a centre crop.

    The small offline images must not lose their borders (dSprites position lives there),
    so ``crop_pct`` is 1.0; mean/std/interpolation come from the model's pretrained config.
    """
    size = model.patch_embed.img_size
    return resolve_model_data_config(model, args={"input_size": (3, *size), "crop_pct": 1.0})


def make_transform(model):
    return create_transform(**data_config(model), is_training=False)


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image).convert("RGB")


def to_tensors(images: np.ndarray, labels: np.ndarray, transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply the shared transform once to a whole split (images are small and fixed)."""
    x = torch.stack([transform(to_pil(im)) for im in images]) if len(images) else torch.empty(0)
    return x, torch.as_tensor(labels, dtype=torch.long)


class LazyInputs:
    """Model inputs of a split too big to hold as float tensors (a VTAB test set): decoded and
    transformed on access, ``x[a:b]`` / ``x[index_tensor]`` → a tensor, so evaluation runs in
    chunks (``measure.accuracy``, the loop's ``evaluate``). ``lazy = True`` marks it."""

    lazy = True

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        if isinstance(idx, (int, np.integer)):
            return self.transform(to_pil(self.images[idx]))
        return to_tensors(self.images[idx], np.zeros(0), self.transform)[0]

    @property
    def shape(self) -> tuple:
        return (len(self), *self[0:1].shape[1:]) if len(self) else (0,)


def task_tensors(task, backbone) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every split of ``task`` through the backbone's transform, as ``(x, y)`` tensors (a lazy
    split, e.g. a VTAB test set, as ``LazyInputs``: transformed chunk by chunk when read)."""
    tf = make_transform(backbone)
    return {split: (LazyInputs(images, tf), torch.as_tensor(labels, dtype=torch.long))
            if getattr(images, "lazy", False) else to_tensors(images, labels, tf)
            for split, (images, labels) in task.splits.items()}


class Pixels:
    """The model's transform split where pixels become floats, so images travel as ``uint8``
    (4x fewer bytes than float32) and are normalized where the model runs.

    ``to_uint8(pil)``: the transform's geometric part (resize, centre crop) on the PIL image →
    ``uint8 [3, H, W]``; ``normalize(u8)``: ``[N, 3, H, W]`` uint8 → float, the transform's own
    ``ToTensor`` scale and ``Normalize``. ``normalize(to_uint8(im)[None])[0]`` equals
    ``transform(im)`` exactly: the same PIL resize, the same float arithmetic.

    ``light``: the geometric part as ``imaging.Geometry`` (Pillow and NumPy only, pixel for pixel
    the same), which ``to_uint8`` applies; None when the transform holds an op it does not model
    (then ``to_uint8`` runs torchvision's). A process that only decodes takes ``light`` and never
    imports torch (``petl predict``'s decode tasks)."""

    def __init__(self, transform, image_size: tuple[int, int]):
        from torchvision import transforms as T

        ops = list(getattr(transform, "transforms", [transform]))
        cut = next((i for i, op in enumerate(ops) if type(op).__name__ in ("ToTensor", "MaybeToTensor")), None)
        if cut is None or not all(isinstance(op, T.Normalize) for op in ops[cut + 1:]) or len(ops) - cut > 2:
            raise ValueError(f"cannot split the transform at ToTensor: {transform}")
        self.geometry = T.Compose(ops[:cut])
        self.light = light_geometry(ops[:cut], tuple(image_size))
        norm = ops[cut + 1] if len(ops) - cut == 2 else None
        self.mean = torch.as_tensor(norm.mean if norm else (0.0, 0.0, 0.0), dtype=torch.float32).view(3, 1, 1)
        self.std = torch.as_tensor(norm.std if norm else (1.0, 1.0, 1.0), dtype=torch.float32).view(3, 1, 1)
        self.image_size = tuple(image_size)

    @classmethod
    def of(cls, model) -> Pixels:
        return cls(make_transform(model), tuple(model.patch_embed.img_size))

    def to_uint8(self, im: Image.Image) -> torch.Tensor:
        if self.light is not None:
            return torch.from_numpy(self.light.to_uint8(im))
        a = np.asarray(self.geometry(im.convert("RGB")), dtype=np.uint8)
        return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous()

    def from_array(self, a: np.ndarray) -> torch.Tensor:
        """``uint8 [H, W]``, ``[H, W, 1]`` or ``[H, W, 3]`` pixels → ``uint8 [3, H', W']`` at the
        model's size; an image already at that size, RGB, is taken as it is (no resize)."""
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim == 3 and a.shape[:2] == self.image_size and a.shape[2] == 3:
            return torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).contiguous()
        return self.to_uint8(Image.fromarray(np.ascontiguousarray(a)))

    def normalize(self, u8: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        x = u8.to(torch.float32).div_(255)
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return x.sub_(mean).div_(std).to(dtype)


def light_geometry(ops: list, image_size: tuple[int, int]):
    """torchvision's ``Resize`` and ``CenterCrop`` ops as an ``imaging.Geometry`` (see ``Pixels``);
    None when another op is among them."""
    from torchvision import transforms as T
    from torchvision.transforms.functional import pil_modes_mapping

    out = []
    for op in ops:
        if type(op) is T.Resize:
            size = (op.size,) if isinstance(op.size, int) else tuple(int(v) for v in op.size)
            mode = op.interpolation if isinstance(op.interpolation, T.InterpolationMode) else None
            if mode not in pil_modes_mapping or len(size) not in (1, 2):
                return None
            out.append(imaging.Resize(size, int(pil_modes_mapping[mode]), op.max_size))
        elif type(op) is T.CenterCrop:
            out.append(imaging.CenterCrop(tuple(int(v) for v in op.size)))
        else:
            return None
    return imaging.Geometry(tuple(out), image_size)
