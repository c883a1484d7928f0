"""DeepMind's evaluation preprocessing (``eval_preproc='resize_crop_32'``) as a timm transform.

The reference evaluates NFNets on ``decode -> squash-resize to (S+32, S+32) with TensorFlow's
bicubic -> centre crop S -> (x - 255*mean) / (255*std)``, float32 and unclamped. timm's
``create_transform`` with the same ``crop_pct`` decodes with PIL's accurate DCT, resizes with
PIL's antialiased bicubic and clamps to uint8, which moves the network's input by up to 1-2
normalised units on real photos. :class:`ReferenceEvalTransform` reproduces the reference's
input instead (see ``docs/data.md`` for the measured differences).
"""
from __future__ import annotations

import numbers
import os
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .decode import ImageDecodeError, decode_image, pil_to_rgb, read_image_bytes
from ..variants import REFERENCE_PADDING
from .resize import resize_crop

__all__ = ['ImageDecodeError', 'ReferenceEvalTransform', 'create_eval_transform', 'to_rgb_array']
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = Union[str, 'os.PathLike[str]', bytes, bytearray, memoryview, Any]


class ReferenceEvalTransform:
    """The reference's eval preprocessing: any image in, a ``(3, S, S)`` float32 tensor out.

    Picklable (it holds only sizes and constants), so it runs in ``DataLoader`` workers.

    Args:
        img_size: the crop ``S`` (int) or ``(height, width)``.
        mean: per-channel mean in [0, 1] units (multiplied by 255 as the reference does).
        std: per-channel standard deviation in [0, 1] units.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]],
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        size = (img_size,) * 2 if isinstance(img_size, numbers.Integral) else tuple(img_size)
        if len(size) != 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                                     for s in size):
            raise ValueError(f'img_size must be a positive int or (height, width), not {img_size!r}')
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f'mean and std need 3 values each (std > 0), got {mean!r} and {std!r}')
        self.img_size: Tuple[int, int] = (int(size[0]), int(size[1]))
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # float32(0.485 * 255) etc., as the reference's constants (a Python double, cast).
        self._mean = torch.tensor([m * 255 for m in self.mean], dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor([s * 255 for s in self.std], dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: ImageInput) -> torch.Tensor:
        """Preprocesses one image.

        Args:
            image: a path, a binary file object, encoded bytes (JPEG, PNG or GIF), a PIL image,
                a uint8 ``(H, W, 3)`` / ``(H, W)`` numpy array, or a uint8 tensor, ``(3, H, W)``
                as torchvision decodes (or ``(H, W, 3)``). Decoded inputs skip the reference's
                decoder, so only a JPEG's decoding can differ from the reference.

        Returns:
            ``(3, S, S)`` float32 tensor, normalised, unclamped.

        Raises:
            ImageDecodeError: unreadable path, empty, truncated or corrupt file, or a format
                the reference's decoder does not read; the message names the file.
            TypeError: an input of another type, or an array that is not uint8.
        """
        hwc = to_rgb_array(image)
        return self.from_array(hwc)

    def from_bytes(self, data: bytes, source: Optional[str] = None) -> torch.Tensor:
        """Preprocesses one encoded image (decoded as TensorFlow decodes it).

        Args:
            data: the file's bytes.
            source: the file's name, for error messages.

        Returns:
            ``(3, S, S)`` float32 tensor, normalised, unclamped.

        Raises:
            ImageDecodeError: an empty, truncated or corrupt file, or a format the reference's
                decoder does not read.
        """
        return self.from_array(decode_image(data, source=source))

    def from_array(self, image: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """Resize, crop and normalise an already decoded uint8 ``(H, W, 3)`` image.

        Args:
            image: a uint8 ``(H, W, 3)`` numpy array or tensor.

        Returns:
            ``(3, S, S)`` float32 tensor, normalised, unclamped.
        """
        if isinstance(image, np.ndarray) and (not image.flags.writeable or min(image.strides) < 0):
            image = np.array(image, order='C')  # a copy: torch wraps only writable, forward-strided arrays
        hwc = torch.as_tensor(image)
        h, w = self.img_size
        full = (h + REFERENCE_PADDING, w + REFERENCE_PADDING)
        # the reference's offsets: ((S + 32) - S + 1) // 2 on each axis
        top, left = (full[0] - h + 1) // 2, (full[1] - w + 1) // 2
        window = resize_crop(hwc, full, (top, left, h, w))
        out = torch.empty(window.shape, dtype=torch.float32)
        return torch.sub(window, self._mean, out=out).div_(self._std)

    def __repr__(self) -> str:
        h, w = self.img_size
        return (f'{type(self).__name__}(decode=libjpeg-turbo IFAST, resize=tf-bicubic '
                f'{h + REFERENCE_PADDING}x{w + REFERENCE_PADDING} (no antialias, unclamped), '
                f'center_crop={h}x{w}, mean={self.mean}, std={self.std})')


def to_rgb_array(image: ImageInput) -> np.ndarray:
    """Any accepted input as a uint8 ``(H, W, 3)`` array, decoding encoded images as TF does.

    Args:
        image: a path, a binary file object, encoded bytes, a PIL image, a uint8 numpy array
            (``(H, W, 3)`` or ``(H, W)``) or a uint8 tensor (``(3, H, W)`` or ``(H, W, 3)``).

    Returns:
        A uint8 ``(H, W, 3)`` array.

    Raises:
        ImageDecodeError: as :func:`decode_image`, or a path that cannot be read.
        TypeError: an unsupported input type or dtype.
    """
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image))
    if isinstance(image, (str, os.PathLike)) or hasattr(image, 'read'):
        data, name = read_image_bytes(image)
        return decode_image(data, source=name)
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise TypeError(f'image tensors must be uint8, not {image.dtype}')
        if image.ndim == 3 and image.shape[0] in (1, 3):  # torchvision's CHW
            if image.shape[-1] in (1, 3):
                raise TypeError(f'ambiguous image tensor of shape {tuple(image.shape)}: CHW or HWC? '
                                'pass a numpy array (HWC) or a tensor of another size')
            image = image.permute(1, 2, 0)
        array = image.cpu().numpy()
    elif isinstance(image, np.ndarray):
        array = image
    elif hasattr(image, 'convert') and hasattr(image, 'mode'):  # a PIL image
        array = pil_to_rgb(image)
    else:
        raise TypeError(f'cannot preprocess a {type(image).__name__}: give a path, bytes, a '
                        'PIL image, or a uint8 array / tensor')
    if array.dtype != np.uint8:
        raise TypeError(f'image arrays must be uint8 (0-255), not {array.dtype}')
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3) or 0 in array.shape:
        raise TypeError(f'image arrays must be (H, W, 3) or (H, W), got shape {tuple(array.shape)}')
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array


def create_eval_transform(model: Any = None, *, img_size: Union[int, Tuple[int, int], None] = None,
                          mean: Optional[Sequence[float]] = None,
                          std: Optional[Sequence[float]] = None) -> ReferenceEvalTransform:
    """DeepMind's eval preprocessing for a model, as a callable for timm datasets and loaders.

    Args:
        model: a model (its ``pretrained_cfg`` is read), a registered model name, or None.
        img_size: the crop size; by default the model's test size (``test_input_size``, else
            ``input_size``). Required when no model is given.
        mean: per-channel mean in [0, 1] units; by default the model's (ImageNet's without one).
        std: per-channel std in [0, 1] units; by default the model's (ImageNet's without one).

    Returns:
        A :class:`ReferenceEvalTransform`: path / bytes / image in, ``(3, S, S)`` float32 out.

    Raises:
        ValueError: no size can be found, or the size / mean / std are malformed.
        RuntimeError: ``model`` names a model timm does not know.
    """
    cfg = _pretrained_cfg(model)
    if img_size is None:
        size = cfg.get('test_input_size') or cfg.get('input_size')
        if size is None:
            raise ValueError('create_eval_transform needs img_size= or a model with a '
                             'pretrained cfg (input_size / test_input_size)')
        img_size = (int(size[-2]), int(size[-1]))
    mean = mean if mean is not None else cfg.get('mean') or IMAGENET_MEAN
    std = std if std is not None else cfg.get('std') or IMAGENET_STD
    return ReferenceEvalTransform(img_size, mean=[float(m) for m in mean], std=[float(s) for s in std])


def _pretrained_cfg(model: Any) -> dict:
    if model is None:
        return {}
    if isinstance(model, str):
        import timm
        name = model.split('.')[0]
        if not timm.is_model(name):
            raise RuntimeError(f'unknown model {model!r} (import timm_nfnet_ext before naming '
                               'its models)')
        cfg = timm.models.get_pretrained_cfg(model)
        return cfg.to_dict() if cfg is not None else {}
    cfg = getattr(model, 'pretrained_cfg', None) or getattr(model, 'default_cfg', None) or {}
    return dict(cfg)

