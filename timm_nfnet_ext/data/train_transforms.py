"""DeepMind's NFNet training input pipeline (``augment_name='cutmix_mixup_randaugment_4LL'``).

Per image, in the dataset (``DataLoader`` workers): decode as TensorFlow does, the reference's
random crop (:func:`~timm_nfnet_ext.data.crop.sample_distorted_crop`), a random left-right flip
and TensorFlow's bicubic resize to the training size, unclipped (:class:`ReferenceTrainTransform`).
Per batch, in the collate function (also in the workers): ``2B`` examples mixed into ``B``
(:func:`~timm_nfnet_ext.data.mixing.mix_batch`), clipped to [0, 255] and truncated to uint8,
RandAugment per image, then ``(x - 255 * mean) / (255 * std)`` (:class:`ReferenceTrainBatch`).

Randomness is ``numpy.random.Generator`` throughout and does not depend on the worker count:
:class:`ReferenceTrainDataset` derives each sample's seed from ``(seed, epoch, index)``, hands
it on with the sample, and the collate function seeds the batch's draws from the seeds of the
samples in it. A loader is built as::

    transform, collate = create_train_pipeline('nfnet_f0')
    data = ReferenceTrainDataset(timm.data.create_dataset('', root), transform, seed=0)
    loader = DataLoader(data, batch_size=2 * B, shuffle=True, drop_last=True,
                        collate_fn=collate, num_workers=8)
"""
from __future__ import annotations

import numbers
import os
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from ..variants import F_VARIANTS, Variant, variant_of
from .crop import sample_distorted_crop
from .datasets import FileImageDataset
from .decode import decode_image, jpeg_components, read_image_bytes
from .mixing import mix_batch
from .randaugment import RandAugment
from .resize import resize_crop
from .transforms import IMAGENET_MEAN, IMAGENET_STD, ImageInput, ReferenceEvalTransform, to_rgb_array

__all__ = ['ReferenceTrainBatch', 'ReferenceTrainDataset', 'ReferenceTrainTransform',
           'create_train_pipeline', 'sample_seed']

Size = Union[int, Tuple[int, int]]


def _size(img_size: Size) -> Tuple[int, int]:
    size = (img_size,) * 2 if isinstance(img_size, numbers.Integral) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0
                                 for s in size):
        raise ValueError(f'img_size must be a positive int or (height, width), not {img_size!r}')
    return int(size[0]), int(size[1])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of sample ``index`` in ``epoch`` of a run seeded with ``seed`` (a 63-bit int).

    Args:
        seed: the run's seed.
        epoch: the epoch.
        index: the sample's index in the dataset.

    Returns:
        The sample's seed, an int in ``[0, 2**63)``.

    Raises:
        ValueError: a negative or non-integer argument.
    """
    parts = (seed, epoch, index)
    if not all(isinstance(p, numbers.Integral) and not isinstance(p, bool) and p >= 0 for p in parts):
        raise ValueError(f'seed, epoch and index must be ints >= 0, not {parts!r}')
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0]
    return int(state >> np.uint64(1))


def _worker_generator() -> np.random.Generator:
    """A generator from torch's RNG: reproducible per worker only (DataLoader seeds each)."""
    return np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,)).item()))


class ReferenceTrainTransform:
    """The reference's per-image training preprocessing: an image in, ``(3, S, S)`` float32 out.

    Random crop (``sample_distorted_bounding_box`` on the decoded size; a centred square when
    it returns the whole image), left-right flip with probability 1/2, TensorFlow's bicubic to
    ``img_size`` (only the crop is resized). Not clipped, not normalised: mixing comes first.
    Picklable, for ``DataLoader`` workers.

    Args:
        img_size: the training size ``S`` (int) or ``(height, width)``.
        min_object_covered: least share of the image a crop covers.
        aspect_ratio_range: crop width / height range, sampled uniformly.
        area_range: crop area range as a share of the image.
        max_attempts: crop draws before falling back to the centre crop.
        flip: whether to flip half of the images left-right.

    Raises:
        ValueError: a malformed ``img_size``.
    """

    def __init__(self, img_size: Size, *, min_object_covered: float = 0.1,
                 aspect_ratio_range: Tuple[float, float] = (3 / 4, 4 / 3),
                 area_range: Tuple[float, float] = (0.08, 1.0), max_attempts: int = 10,
                 flip: bool = True):
        self.img_size = _size(img_size)
        self.crop_args = dict(min_object_covered=float(min_object_covered),
                              aspect_ratio_range=tuple(float(a) for a in aspect_ratio_range),
                              area_range=tuple(float(a) for a in area_range), max_attempts=int(max_attempts))
        self.flip = bool(flip)

    def __call__(self, image: ImageInput, generator: Optional[np.random.Generator] = None) -> torch.Tensor:
        """Crop, flip and resize one image.

        Args:
            image: a path, binary file, encoded bytes, PIL image or uint8 array / tensor (as
                :func:`~timm_nfnet_ext.data.transforms.to_rgb_array` takes; files are decoded as
                TensorFlow decodes them).
            generator: the random source; by default one drawn from torch's RNG (reproducible
                per DataLoader worker only: use :class:`ReferenceTrainDataset` for more).

        Returns:
            ``(3, S_h, S_w)`` float32 tensor, pixel values in about [-50, 305] (unclipped).

        Raises:
            ImageDecodeError: an unreadable or corrupt image (naming the file).
            TypeError: an unsupported input, or a generator that is not a numpy Generator.
        """
        if _is_encoded(image):
            data, name = _read_encoded(image)
            return self.from_decoded(decode_image(data, source=name), generator, jpeg_components(data))
        return self.from_decoded(to_rgb_array(image), generator)

    def from_decoded(self, hwc: np.ndarray, generator: Optional[np.random.Generator] = None,
                     components: Optional[int] = None) -> torch.Tensor:
        """Crop, flip and resize one decoded image.

        Args:
            hwc: a uint8 ``(H, W, 3)`` array (the reference decoder's output).
            generator: as in :meth:`__call__`.
            components: the colour components of the JPEG it was decoded from, if it was one:
                for other than 3 the reference never falls back to the centre crop (see
                :func:`~timm_nfnet_ext.data.crop.sample_distorted_crop`).

        Returns:
            ``(3, S_h, S_w)`` float32 tensor, unclipped.

        Raises:
            TypeError: a generator that is not a numpy Generator.
        """
        if generator is None:
            generator = _worker_generator()
        elif not isinstance(generator, np.random.Generator):
            raise TypeError(f'generator must be a numpy.random.Generator, not {type(generator).__name__}')
        top, left, h, w = sample_distorted_crop(hwc.shape[0], hwc.shape[1], generator, img_size=self.img_size,
                                                fallback=components in (None, 3), **self.crop_args)
        flip = self.flip and generator.random() < 0.5
        if not hwc.flags.writeable or hwc.strides[1:] != (3, 1):
            hwc = np.array(hwc, order='C')  # torch wraps writable arrays with contiguous pixels
        crop = torch.from_numpy(hwc)[top:top + h, left:left + w]
        if flip:  # before the resize, as the reference (the resize is not exactly mirror-symmetric)
            crop = torch.flip(crop, [1])
        out_h, out_w = self.img_size
        return resize_crop(crop, self.img_size, (0, 0, out_h, out_w)).contiguous()

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(img_size={self.img_size}, crop=sample_distorted_bounding_box'
                f'{self.crop_args}, flip={self.flip}, resize=tf-bicubic (unclamped))')


def _is_encoded(image: Any) -> bool:
    """A path, a binary file or encoded bytes (not a decoded image)."""
    return isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)) or hasattr(image, 'read')


def _read_encoded(image: Any) -> Tuple[bytes, Optional[str]]:
    """The bytes of an encoded image, and its file's name where it has one."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image), None
    return read_image_bytes(image)


class _DecodedImage(ReferenceEvalTransform):
    """Makes :class:`FileImageDataset` hand over the reference decoder's array untouched, with the
    JPEG's component count (None where there was no file).

    FileImageDataset decodes files with the reference's decoder only for eval transforms; the
    training transform needs the same files and decoding, with its own generator per sample.
    """

    def __init__(self) -> None:
        super().__init__(1)

    def __call__(self, image: ImageInput) -> Any:  # type: ignore[override]
        if _is_encoded(image):  # a path or file in a plain list of samples: keep its components
            data, name = _read_encoded(image)
            return self.from_bytes(data, name)
        return self.from_array(image)

    def from_bytes(self, data: bytes, source: Optional[str] = None) -> Any:  # type: ignore[override]
        return decode_image(data, source=source), jpeg_components(data)

    def from_array(self, image: Union[np.ndarray, torch.Tensor]) -> Any:  # type: ignore[override]
        return to_rgb_array(image), None


class ReferenceTrainDataset(Dataset):
    """A dataset's samples through a :class:`ReferenceTrainTransform`, each with its own seed.

    Files are read and decoded as the reference does (via :class:`FileImageDataset`: timm
    datasets, torchvision ``ImageFolder``, or any map-style dataset of ``(image, target)``).
    Item ``i`` of epoch ``e`` is ``(tensor, target, seed)`` with ``seed = sample_seed(seed, e, i)``
    and the transform drawing from ``numpy.random.default_rng(seed)``: the same under any
    worker count. :class:`ReferenceTrainBatch` seeds each batch from these seeds.

    Args:
        dataset: the source dataset (its own transform is not used).
        transform: the per-image training transform.
        seed: the run's seed (int >= 0).
    """

    def __init__(self, dataset: Dataset, transform: ReferenceTrainTransform, seed: int = 0):
        if not isinstance(transform, ReferenceTrainTransform):
            raise TypeError(f'transform must be a ReferenceTrainTransform, not {type(transform).__name__}')
        sample_seed(seed, 0, 0)  # validates the seed
        self.files = FileImageDataset(dataset, _DecodedImage())
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """New draws for every sample; call before iterating (workers copy the dataset then).

        Args:
            epoch: the epoch (int >= 0).

        Raises:
            ValueError: a negative or non-integer ``epoch``.
        """
        sample_seed(self.seed, epoch, 0)
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Tuple[torch.Tensor, int, int]:
        """Sample ``key``: an index (its seed from ``(seed, epoch, index)``), or an ``(index, seed)``
        pair from a sampler that seeds its samples itself (``timm-nfnet-train``'s ``EpochSampler``)."""
        index, seed = key if isinstance(key, tuple) else (key, sample_seed(self.seed, self.epoch, int(key)))
        (image, components), target = self.files[index]
        return self.transform.from_decoded(image, np.random.default_rng(seed), components), target, seed


class ReferenceTrainBatch:
    """Collate ``2B`` samples into the reference's mixed, augmented, normalised batch of ``B``.

    ``DataLoader(collate_fn=ReferenceTrainBatch(...), batch_size=2 * B, drop_last=True)``; it runs
    in the workers and is picklable. Steps: MixUp + CutMix (:func:`mix_batch`), clip to [0, 255],
    truncate to uint8, RandAugment per image, ``(x - 255 * mean) / (255 * std)``.

    Randomness: samples of three elements ``(image, label, seed)`` (from
    :class:`ReferenceTrainDataset`) seed the batch's generator with all their seeds, so a batch
    is the same whichever worker builds it. Samples without seeds use a generator from torch's
    RNG (reproducible per worker only).

    Args:
        num_classes: classes of the one-hot targets.
        magnitude: RandAugment's magnitude ``M`` (the variant's ``randaug_magnitude``).
        num_layers: RandAugment ops per image.
        mean: per-channel mean in [0, 1] units.
        std: per-channel std in [0, 1] units.
        mixup_alpha: MixUp's Beta parameter.
        label_smoothing: label smoothing of the targets.

    Raises:
        ValueError: bad ``num_classes``, magnitude, layers, mean / std or smoothing.
    """

    def __init__(self, num_classes: int = 1000, magnitude: float = 10, num_layers: int = 4,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 mixup_alpha: float = 0.2, label_smoothing: float = 0.1):
        if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes <= 0:
            raise ValueError(f'num_classes must be a positive int, not {num_classes!r}')
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f'mean and std need 3 values each (std > 0), got {mean!r} and {std!r}')
        if not 0 <= label_smoothing < 1 or not mixup_alpha > 0:
            raise ValueError(f'label_smoothing must be in [0, 1) and mixup_alpha > 0, got '
                             f'{label_smoothing!r} and {mixup_alpha!r}')
        self.num_classes = int(num_classes)
        self.randaugment = RandAugment(num_layers, magnitude)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.mixup_alpha = float(mixup_alpha)
        self.label_smoothing = float(label_smoothing)

    def __call__(self, samples: Sequence[Sequence[Any]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Mix, augment and normalise a list of ``2B`` samples.

        Args:
            samples: ``(image, label)`` or ``(image, label, seed)`` tuples; images ``(3, S, S)``
                float tensors from :class:`ReferenceTrainTransform`; ``2B`` a multiple of 4.

        Returns:
            ``(images, targets)``: ``(B, 3, S, S)`` float32 and ``(B, num_classes)`` float32.

        Raises:
            ValueError: a batch size that is not a multiple of 4, images of different sizes,
                labels out of range.
            TypeError: samples that are not ``(tensor, label[, seed])`` tuples.
        """
        images, labels, generator = self._unpack(samples)
        mixed, targets = mix_batch(images, labels, self.num_classes, generator,
                                   mixup_alpha=self.mixup_alpha, label_smoothing=self.label_smoothing)
        pixels = mixed.clamp_(0.0, 255.0).to(torch.uint8)  # truncation, as tf.cast
        for i in range(pixels.shape[0]):
            pixels[i] = self.randaugment(pixels[i], generator)
        # float32(m * 255) etc., as the reference's constants; written over the mixed batch
        mean = torch.tensor([m * 255 for m in self.mean], dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor([s * 255 for s in self.std], dtype=torch.float32).view(3, 1, 1)
        # cast-copy first: torch's mixed uint8 - float32 arithmetic is several times slower
        return mixed.copy_(pixels).sub_(mean).div_(std), targets

    def _unpack(self, samples: Sequence[Sequence[Any]]
                ) -> Tuple[List[torch.Tensor], torch.Tensor, np.random.Generator]:
        if not isinstance(samples, (list, tuple)) or not samples:
            raise TypeError(f'samples must be a non-empty list of (image, label[, seed]), not {type(samples).__name__}')
        if not all(isinstance(s, (list, tuple)) and len(s) in (2, 3) and isinstance(s[0], torch.Tensor)
                   for s in samples):
            raise TypeError('each sample must be (image tensor, label) or (image tensor, label, seed)')
        shapes = {tuple(s[0].shape) for s in samples}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[0] != 3:
            raise ValueError(f'images must all be (3, S, S) of one size, got shapes {sorted(shapes)}')
        images = [s[0].float() for s in samples]  # mixed from the list: no 2B stack
        labels = torch.as_tensor([int(s[1]) for s in samples], dtype=torch.int64)
        if all(len(s) == 3 for s in samples):
            generator = np.random.default_rng([int(s[2]) for s in samples])
        else:
            generator = _worker_generator()
        return images, labels, generator

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(num_classes={self.num_classes}, mixup=Beta({self.mixup_alpha:g}) + '
                f'cutmix, {self.randaugment!r}, label_smoothing={self.label_smoothing:g}, '
                f'mean={self.mean}, std={self.std})')


def create_train_pipeline(model_or_variant: Any = None, *, img_size: Optional[Size] = None,
                          magnitude: Optional[float] = None, num_classes: Optional[int] = None,
                          num_layers: int = 4) -> Tuple[ReferenceTrainTransform, ReferenceTrainBatch]:
    """The reference's training transform and collate function for an NFNet variant.

    Args:
        model_or_variant: a :class:`~timm_nfnet_ext.variants.Variant`, its index (0-7), a
            model name (``'nfnet_f1'``, ``'nfnet_f1_plus'``...), a model built by timm, or None
            (then ``img_size`` and ``magnitude`` are required).
        img_size: training size; by default the variant's ``train_size``.
        magnitude: RandAugment magnitude; by default the variant's (5, 10 or 15).
        num_classes: classes of the targets; by default the model's, else 1000.
        num_layers: RandAugment layers (the recipe's 4).

    Returns:
        ``(transform, collate)``: a :class:`ReferenceTrainTransform` and a
        :class:`ReferenceTrainBatch`.

    Raises:
        ValueError: no variant is recognised and a size or magnitude is missing, or bad values.
    """
    variant = _variant(model_or_variant)
    if num_classes is None:
        num_classes = int(getattr(model_or_variant, 'num_classes', 0) or 1000)
    if variant is None and (img_size is None or magnitude is None):
        raise ValueError(f'no NFNet-F variant found for {model_or_variant!r}: pass img_size= and magnitude=')
    img_size = img_size if img_size is not None else variant.train_size
    magnitude = magnitude if magnitude is not None else variant.randaug_magnitude
    return (ReferenceTrainTransform(img_size),
            ReferenceTrainBatch(num_classes, magnitude=magnitude, num_layers=num_layers))


def _variant(model_or_variant: Any) -> Optional[Variant]:
    if model_or_variant is None:
        return None
    if isinstance(model_or_variant, Variant):
        return model_or_variant
    if isinstance(model_or_variant, numbers.Integral) and not isinstance(model_or_variant, bool):
        if not 0 <= model_or_variant < len(F_VARIANTS):
            raise ValueError(f'NFNet-F variants are 0..{len(F_VARIANTS) - 1}, not {model_or_variant}')
        return F_VARIANTS[int(model_or_variant)]
    if isinstance(model_or_variant, str):
        return variant_of(model_or_variant)
    cfg = getattr(model_or_variant, 'pretrained_cfg', None) or getattr(model_or_variant, 'default_cfg', None) or {}
    name = cfg.get('architecture') or type(model_or_variant).__name__
    return variant_of(str(name))
