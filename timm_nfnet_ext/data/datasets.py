"""Feeding a timm dataset's image files, not PIL images, to an eval transform.

timm's ``ImageDataset`` decodes every image with PIL before the transform sees it (or hands
over anonymous bytes with ``load_bytes=True``). The reference pipeline must decode the file
itself, and an unreadable file must be reported by its path, so :class:`FileImageDataset`
reads each sample's file from the dataset's reader and passes the open file to the transform.
Datasets without files (``torch/`` sets, the built-in digits) pass their decoded images on.
"""
from __future__ import annotations

from typing import Any, Callable, Tuple

import torch
from torch.utils.data import Dataset

from .decode import ImageDecodeError, decode_image
from .transforms import ReferenceEvalTransform

__all__ = ['FileImageDataset']


class FileImageDataset(Dataset):
    """A dataset's samples through ``transform``, from their files where they have files.

    Args:
        dataset: a timm dataset (``timm.data.create_dataset``; its own transform is not used)
            or any map-style dataset of ``(image, target)``.
        transform: the eval transform. A :class:`ReferenceEvalTransform` gets the open file
            (decoded as the reference decodes); any other transform gets a PIL RGB image.

    Items are ``(tensor, target)``; an unreadable image raises :class:`ImageDecodeError`
    naming its file.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Any], torch.Tensor]):
        self.dataset = dataset
        self.transform = transform
        self._decode_files = isinstance(transform, ReferenceEvalTransform)
        reader = getattr(dataset, 'reader', None)
        # timm's folder and tar readers hand out open files: the reference decodes those itself
        self._reader = reader if reader is not None and hasattr(dataset, 'filename') else None

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, index: int) -> str:
        """The sample's file path (or a description for datasets without files)."""
        if self._reader is not None:
            return str(self.dataset.filename(index, absolute=True))
        return f'{type(self.dataset).__name__}[{index}]'

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if self._reader is None:
            image, target = _untransformed(self.dataset, index)
            return self.transform(image), target
        sample, target = self._reader[index]
        target = -1 if target is None else target
        if getattr(self.dataset, 'target_transform', None) is not None:
            target = self.dataset.target_transform(target)
        name = self.name(index)
        if not hasattr(sample, 'read'):  # a reader of decoded images (hfds/...)
            return self.transform(sample), target
        with sample:
            data = sample.read()
        if self._decode_files:
            return self.transform.from_array(decode_image(data, source=name)), target
        return self.transform(_pil_rgb(data, name)), target


def _untransformed(dataset: Dataset, index: int) -> Tuple[Any, int]:
    """``dataset[index]`` with the dataset's own transform switched off."""
    own = getattr(dataset, 'transform', None)
    if own is None:
        return dataset[index]
    dataset.transform = None
    try:
        return dataset[index]
    finally:
        dataset.transform = own


def _pil_rgb(data: bytes, name: str) -> Any:
    """PIL's decode, as timm's ``ImageDataset`` does it, with the file named on failure."""
    import io
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert('RGB')
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageDecodeError(f'{name}: PIL cannot decode it ({e})') from None

