"""Feeding a timm dataset's image files, not PIL images, to an eval transform.

timm's ``ImageDataset`` decodes every image with PIL before the transform sees it (or hands
over anonymous bytes with ``load_bytes=True``). The reference pipeline must decode the file
itself, and an unreadable file must be reported by its path, so :class:`FileImageDataset`
reads each sample's file (from timm's readers, or the ``samples`` list of torchvision's
``ImageFolder``) and decodes it as the reference does. Datasets without files (torchvision's
in-memory sets, the built-in digits) pass their decoded images on.
"""
from __future__ import annotations

import os
import tarfile
import zipfile

from typing import Any, Callable, Tuple

import torch
from torch.utils.data import Dataset

from .decode import ImageDecodeError
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
        # torchvision's ImageFolder / DatasetFolder (torch/ datasets) list (path, target) samples
        samples = getattr(dataset, 'samples', None)
        self._samples = samples if self._reader is None and _is_path_list(samples) else None

    def __len__(self) -> int:
        return len(self.dataset)

    def name(self, index: int) -> str:
        """The sample's file path (or a description for datasets without files).

        Args:
            index: the sample's index.

        Returns:
            The absolute path, or ``ClassName[index]``.
        """
        if self._reader is not None:
            return str(self.dataset.filename(index, absolute=True))
        if self._samples is not None:
            return str(self._samples[index][0])
        return f'{type(self.dataset).__name__}[{index}]'

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        if self._samples is not None:
            path, target = self._samples[index][:2]
            data = _read(lambda: open(path, 'rb'), str(path))
            if getattr(self.dataset, 'target_transform', None) is not None:
                target = self.dataset.target_transform(target)
            return self._apply(data, str(path)), target
        if self._reader is None:
            image, target = _untransformed(self.dataset, index)
            return self.transform(image), target
        name = self.name(index)
        sample, target = _read(lambda: self._reader[index][:2], name)
        if target is None:
            target = -1  # timm's rule; its target_transform is not applied to it
        elif getattr(self.dataset, 'target_transform', None) is not None:
            target = self.dataset.target_transform(target)
        if not hasattr(sample, 'read'):  # a reader of decoded images (hfds/...)
            return self.transform(sample), target
        return self._apply(_read(lambda: sample, name), name), target

    def _apply(self, data: bytes, name: str) -> torch.Tensor:
        if self._decode_files:
            return self.transform.from_bytes(data, name)
        return self.transform(_pil_rgb(data, name))


def _is_path_list(samples: Any) -> bool:
    try:
        return len(samples) > 0 and isinstance(samples[0][0], (str, os.PathLike))
    except (TypeError, IndexError, KeyError):
        return False


def _read(get: Callable[[], Any], name: str) -> Any:
    """``get()`` (an open or a reader access), and the bytes of what it returns when it is a
    file; an OS or archive error becomes an :class:`ImageDecodeError` naming the file."""
    try:
        item = get()
        if hasattr(item, 'read'):
            with item:
                return item.read()
        return item
    except (OSError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise ImageDecodeError(f'{name}: cannot read ({e})') from None


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

