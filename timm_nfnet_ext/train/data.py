"""Data for ``timm-nfnet-train``: datasets, transforms and resumable, distributed loaders.

Datasets and transforms are timm's (``create_dataset``, ``resolve_data_config``,
``create_transform``). The sampler is this module's own, because a resumable run needs what
timm's loaders do not give: the order of an epoch is a function of (seed, epoch) only, a run
can start in the middle of an epoch, and with N processes each global batch is the same set
of images as in a 1-process run with N times the batch. Each image's augmentation is drawn
from its own seed (seed, epoch, index), so it does not depend on workers, ranks or resumes.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data import FileImageDataset, create_eval_transform
from ..data.train_transforms import sample_seed
from ..variants import reference_crop_pct
from .config import TrainConfig
from .recipe import TrainError

__all__ = ['DigitsDataset', 'SeededDataset', 'EpochSampler', 'build_datasets', 'build_loader',
           'sample_seed', 'num_classes_of']

DIGITS = 'digits'


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 handwritten digits (8x8, shipped in the wheel), upscaled RGB images.

    A fixed stratified split: ``val_fraction`` of each class is the 'validation' split.
    Items are ``(PIL.Image, label)`` before ``transform``.

    Args:
        split: ``'train'``, ``'validation'`` or ``'val'``.
        image_size: the side of the RGB images, upscaled bicubically from 8x8.
        val_fraction: the fraction of each class held out for validation.
        transform: applied to each image, or ``None``.

    Raises:
        TrainError: scikit-learn is not installed, or another split is asked for.
    """

    def __init__(self, split: str = 'train', image_size: int = 32, val_fraction: float = 0.2,
                 transform: Any = None) -> None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise TrainError('the built-in digits dataset needs scikit-learn: pip install '
                             '"timm-nfnet-ext[train]"') from e
        if split not in ('train', 'validation', 'val'):
            raise TrainError(f"the digits dataset has splits 'train' and 'validation', not {split!r}")
        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        labels = digits.target.astype(np.int64)
        rng = np.random.default_rng(0)
        val = np.zeros(len(labels), dtype=bool)
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            val[idx[:int(round(len(idx) * val_fraction))]] = True
        keep = val if split != 'train' else ~val
        self.images = [_upscale(img, image_size) for img in images[keep]]
        self.targets = labels[keep]
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img = self.images[index]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.targets[index])


def _upscale(image: np.ndarray, size: int) -> Any:
    """An 8x8 grey digit as a ``size`` x ``size`` RGB PIL image (bicubic)."""
    from PIL import Image
    return Image.fromarray(image).resize((size, size), Image.BICUBIC).convert('RGB')


def epoch_seed(seed: int, epoch: int, read: int = 0) -> int:
    """The seed of an epoch's order (of its ``read``-th pass over the data, when it reads it more than once).

    Args:
        seed: the run's seed.
        epoch: the epoch.
        read: the pass over the data within the epoch (0: the first; its seed is the 1-read epoch's).

    Returns:
        A 32-bit seed from ``numpy.random.SeedSequence``.
    """
    return int(np.random.SeedSequence([seed, epoch] + ([read] if read else [])).generate_state(1)[0])


@contextlib.contextmanager
def _isolated_rng(seed: int) -> Iterator[None]:
    """Seed python, numpy and torch RNGs for a block, then put their previous states back."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        np.random.seed(seed & 0xFFFFFFFF)  # numpy's legacy seed is 32 bits
        # the CPU generator only: torch.manual_seed would also (lazily) reseed every CUDA
        # generator, which fork_rng(devices=[]) does not restore, and costs time per image
        torch.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededDataset(Dataset):
    """Wraps a map-style dataset; ``ds[(index, seed)]`` draws the item's augmentation from ``seed``.

    A plain ``ds[index]`` (evaluation: deterministic transforms) skips the RNG seeding.
    After a seeded item the python, numpy and torch CPU RNG states are put back as they were.

    Args:
        dataset: the map-style dataset wrapped.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        index, seed = key
        with _isolated_rng(seed):
            return self.dataset[index]


class EpochSampler(Sampler):
    """Yields ``(index, seed)`` (training) or ``index`` (evaluation) for one rank: a resumable,
    distributed epoch order.

    Training: the epoch permutation comes from ``(seed, epoch)``; it is cut into global
    micro-batches of ``batch_size * world_size`` (the incomplete tail is dropped, then the
    micro-batches that do not fill an optimizer step); rank ``r`` takes the r-th slice of each.
    ``set_epoch(epoch, start)`` starts at global micro-batch ``start``.
    Evaluation (``shuffle=False``): every ``world_size``-th index from ``rank``, nothing dropped.
    With ``reads=2`` an epoch is two permutations in a row (the reference pipeline decodes 2B
    images per step of B, so an epoch of the reference's length reads the data twice); each
    read draws other augmentations.

    Args:
        size: the dataset's length.
        batch_size: the batch size per process (loader batches).
        rank: this process's rank.
        world_size: the number of processes.
        seed: the run's seed (epoch orders and per-image seeds).
        shuffle: ``True`` for training, ``False`` for evaluation.
        accum_steps: micro-batches per optimizer step (an epoch holds whole steps only).
        reads: passes over the data per epoch.
    """

    def __init__(self, size: int, batch_size: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, accum_steps: int = 1, reads: int = 1) -> None:
        self.size, self.batch_size, self.rank, self.world_size = size, batch_size, rank, world_size
        self.seed, self.shuffle, self.accum_steps, self.reads = seed, shuffle, accum_steps, reads
        self.epoch, self.start = 0, 0

    @property
    def micro_batches(self) -> int:
        """Global micro-batches per epoch (training): whole optimizer steps of full micro-batches."""
        n = self.size * self.reads // (self.batch_size * self.world_size)
        return n - n % self.accum_steps

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Position the sampler for the next iteration.

        Args:
            epoch: the epoch whose order to yield.
            start: the global micro-batch to start at (a resume in the middle of the epoch).
        """
        self.epoch, self.start = epoch, start

    def _indices(self) -> List[Tuple[int, int]]:
        """This rank's ``(index, read)`` pairs of the epoch, from its start."""
        order = torch.cat([torch.randperm(self.size, generator=torch.Generator().manual_seed(
            epoch_seed(self.seed, self.epoch, read))) for read in range(self.reads)])
        reads = torch.arange(self.reads).repeat_interleave(self.size)
        b, w = self.batch_size, self.world_size
        # global micro-batches [start, micro_batches), each of w slices of b: this rank's slice of each
        taken = slice(self.start * b * w, self.micro_batches * b * w)
        mine = torch.stack([order[taken], reads[taken]], 1).view(-1, w, b, 2)[:, self.rank].reshape(-1, 2)
        return [(i, r) for i, r in mine.tolist()]

    def __iter__(self) -> Iterator[Union[int, Tuple[int, int]]]:
        if not self.shuffle:  # evaluation: no augmentation to seed
            yield from range(self.rank, self.size, self.world_size)
            return
        for i, read in self._indices():
            yield i, sample_seed(self.seed, self.epoch * self.reads + read, i)

    def __len__(self) -> int:
        if not self.shuffle:
            return len(range(self.rank, self.size, self.world_size))
        return (self.micro_batches - self.start) * self.batch_size


@dataclass
class DataBundle:
    """The datasets and the resolved preprocessing (``collate``: the training batches' collate
    function, None for torch's default).

    Attributes:
        train: the training dataset, its transforms set.
        val: the validation dataset, or ``None``.
        data_config: timm's resolved data config, plus ``train_pipeline`` and, with validation,
            ``val_preprocess``, ``val_input_size`` and ``val_crop_pct``.
        name: the dataset's name (``'digits'``, ``'ImageFolder'``, or a timm scheme such as ``torch/cifar10``).
        collate: the training collate (the reference pipeline's mixing), or ``None``.
        reads: passes over the training data per epoch (2 with the reference pipeline).
        num_classes: the classes the training split declares, or ``None``.
    """
    train: Dataset
    val: Optional[Dataset]
    data_config: Dict[str, Any]
    name: str
    collate: Optional[Callable[[List[Any]], Any]] = None
    reads: int = 1
    num_classes: Optional[int] = None


def _dataset_name(cfg: TrainConfig) -> str:
    if cfg.dataset:
        return cfg.dataset
    return '' if cfg.data_dir else DIGITS


def _check_folder(cfg: TrainConfig, name: str) -> None:
    if name == DIGITS or name.startswith(('hfds/', 'hfids/')) or cfg.dataset_download:
        return
    if not cfg.data_dir:
        raise TrainError(f'--dataset {name!r} needs --data-dir (its root folder)')
    if not os.path.isdir(cfg.data_dir):
        raise TrainError(f'data folder {cfg.data_dir!r} does not exist (or is not a folder)')
    if not any(os.scandir(cfg.data_dir)):
        raise TrainError(f'data folder {cfg.data_dir!r} is empty')
    if name == '':
        for split, flag in ((cfg.train_split, '--train-split'), (cfg.val_split, '--val-split')):
            if split and _split_folder(cfg.data_dir, split) is None:
                hint = " (--val-split '' trains without validation)" if flag == '--val-split' else ''
                raise TrainError(f'data folder {cfg.data_dir!r} has no {split!r} split folder '
                                 f'(looked for {", ".join(_synonyms(split))}); set {flag}{hint}')


_SPLIT_SYNONYMS = (('train', 'training'), ('validation', 'val', 'valid', 'eval', 'evaluation'))


def _synonyms(split: str) -> Tuple[str, ...]:
    for group in _SPLIT_SYNONYMS:
        if split in group:
            return group
    return (split,)


def _split_folder(root: str, split: str) -> Optional[str]:
    """The sub-folder of ``root`` that holds ``split`` (timm's synonyms: val/validation...)."""
    for name in _synonyms(split):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    return None


def _make(cfg: TrainConfig, name: str, split: str, is_training: bool, image_size: int,
          class_map: Any = None) -> Dataset:
    if name == DIGITS:
        return DigitsDataset(split, image_size=image_size)
    from timm.data import create_dataset
    try:
        ds = create_dataset(name, root=cfg.data_dir, split=split, is_training=is_training,
                            class_map=class_map or cfg.class_map, download=cfg.dataset_download,
                            batch_size=cfg.batch_size, seed=cfg.seed)
    except (RuntimeError, FileNotFoundError, AssertionError, ValueError) as e:
        raise TrainError(f'cannot open the {split!r} split of {name or "ImageFolder"} at '
                         f'{cfg.data_dir!r}: {e}') from e
    if not hasattr(ds, '__getitem__') or isinstance(ds, torch.utils.data.IterableDataset):
        raise TrainError(f'--dataset {name!r} is an iterable dataset; this command needs a map-style '
                         'one (ImageFolder, torch/, hfds/) to resume mid-epoch')
    if len(ds) == 0:
        raise TrainError(f'the {split!r} split of {cfg.data_dir!r} holds no images')
    return ds


def num_classes_of(dataset: Dataset) -> Optional[int]:
    """Number of classes a dataset declares (ImageFolder, torch/ and the digits), else None.

    Args:
        dataset: the dataset (its ``class_to_idx`` or ``classes``, or its timm reader's).

    Returns:
        The number of classes, or ``None`` when it declares none.
    """
    for obj in (dataset, getattr(dataset, 'reader', None)):
        for attr in ('class_to_idx', 'classes'):
            value = getattr(obj, attr, None)
            if value:
                return len(value)
    return None


def _class_to_idx(dataset: Dataset) -> Optional[Dict[str, int]]:
    for obj in (dataset, getattr(dataset, 'reader', None)):
        mapping = getattr(obj, 'class_to_idx', None)
        if isinstance(mapping, dict) and mapping:
            return mapping
    return None


def _with_train_labels(cfg: TrainConfig, name: str, train: Dataset, val: Dataset, size: int) -> Dataset:
    """The validation split labelled with the training split's class indices.

    An ImageFolder numbers the classes it finds in each split on its own, so a validation folder
    missing one class would shift every later label and the accuracy would be silently wrong
    (timm's train.py has this too). A subset of the training classes is relabelled; a class the
    training split lacks is refused.
    """
    train_map, val_map = _class_to_idx(train), _class_to_idx(val)
    if train_map is None or val_map is None or train_map == val_map:
        return val
    extra = sorted(set(val_map) - set(train_map))
    if extra:
        more = f' and {len(extra) - 10} more' if len(extra) > 10 else ''
        raise TrainError(f'the {cfg.val_split!r} split has classes the {cfg.train_split!r} split lacks: '
                         f'{", ".join(extra[:10])}{more}')
    return _make(cfg, name, cfg.val_split, False, size, class_map=dict(train_map))


def build_datasets(cfg: TrainConfig, pretrained_cfg: Dict[str, Any]) -> DataBundle:
    """The train / validation datasets for a model's ``pretrained_cfg``.

    Training uses timm's transforms. Validation uses the reference's eval pipeline with
    ``--val-preprocess reference`` (the paper recipe's default) and timm's otherwise; the data
    config records which (``val_preprocess``, ``val_input_size``, ``val_crop_pct``).

    Args:
        cfg: the settings (data, sizes, pipelines and augmentation).
        pretrained_cfg: the model's default pretrained cfg (input size, mean/std, test size).

    Returns:
        The datasets, their data config, name, collate and classes.

    Raises:
        TrainError: ``--val-img-size`` without ``--val-preprocess reference``; a dataset without its
            ``--data-dir``; a missing, empty or split-less data folder; a split timm cannot open, that is
            iterable or holds no images; validation classes the training split lacks; ``--data-pipeline
            reference`` with ``--mixup`` not > 0 or an unknown number of classes; scikit-learn missing
            for the digits.
    """
    from timm.data import create_transform, resolve_data_config
    name = _dataset_name(cfg)
    if cfg.val_img_size and cfg.val_preprocess != 'reference':
        raise TrainError('--val-img-size sets the reference validation crop: it needs --val-preprocess '
                         'reference (timm\'s pipeline takes --img-size / --crop-pct)')
    _check_folder(cfg, name)
    data_cfg = resolve_data_config(
        {k: getattr(cfg, k) for k in ('input_size', 'img_size', 'crop_pct', 'mean', 'std', 'interpolation')
         if getattr(cfg, k, None) not in (None, '')}, pretrained_cfg=pretrained_cfg)
    size = data_cfg['input_size'][-1]
    train = _make(cfg, name, cfg.train_split, True, size)
    val = _make(cfg, name, cfg.val_split, False, size) if cfg.val_split else None
    if val is not None:
        val = _with_train_labels(cfg, name, train, val, size)
    collate, reads, num_classes = None, 1, num_classes_of(train)
    if cfg.data_pipeline == 'reference':
        train, collate = _reference_training(cfg, train, data_cfg, num_classes)
        reads = 2  # 2B decoded images per step of B: an epoch of the reference's length reads the data twice
    else:
        train.transform = create_transform(
            data_cfg['input_size'], is_training=True, no_aug=cfg.no_aug, scale=tuple(cfg.scale),
            ratio=tuple(cfg.ratio), hflip=cfg.hflip, vflip=cfg.vflip, color_jitter=cfg.color_jitter,
            auto_augment=cfg.aa, interpolation=cfg.train_interpolation, mean=data_cfg['mean'], std=data_cfg['std'],
            re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount)
    data_cfg = dict(data_cfg, train_pipeline=cfg.data_pipeline)
    if val is not None and cfg.val_preprocess == 'reference':
        s = _reference_val_size(cfg, data_cfg, pretrained_cfg)
        val = FileImageDataset(val, create_eval_transform(img_size=s, mean=data_cfg['mean'], std=data_cfg['std']))
        data_cfg = dict(data_cfg, val_preprocess='reference', val_input_size=(3, s, s), val_crop_pct=reference_crop_pct(s))
    elif val is not None:
        val.transform = create_transform(
            data_cfg['input_size'], is_training=False, interpolation=data_cfg['interpolation'], mean=data_cfg['mean'],
            std=data_cfg['std'], crop_pct=data_cfg['crop_pct'], crop_mode=data_cfg.get('crop_mode'))
        data_cfg = dict(data_cfg, val_preprocess='timm', val_input_size=tuple(data_cfg['input_size']),
                   val_crop_pct=data_cfg['crop_pct'])
    return DataBundle(train, val, data_cfg, name or 'ImageFolder', collate, reads, num_classes)


def _reference_training(cfg: TrainConfig, train: Dataset, data_cfg: Dict[str, Any],
                        num_classes: Optional[int]) -> Tuple[Dataset, Callable[[List[Any]], Any]]:
    """The training split through DeepMind's pipeline (``data/train_transforms.py``): the per-image
    crop, flip and resize in the dataset; mixing, RandAugment and normalisation in the collate."""
    from ..data.train_transforms import ReferenceTrainBatch, ReferenceTrainDataset, ReferenceTrainTransform
    from ..variants import F_VARIANTS, variant_of
    if cfg.mixup <= 0:
        raise TrainError('--data-pipeline reference always mixes (half MixUp, half CutMix): --mixup sets its '
                         f'Beta alpha and must be > 0, got {cfg.mixup}')
    num_classes = cfg.num_classes or num_classes
    if not num_classes:
        raise TrainError('cannot tell the number of classes of this dataset; pass --num-classes')
    magnitude = cfg.randaug_magnitude
    if magnitude is None:
        magnitude = (variant_of(cfg.model) or F_VARIANTS[0]).randaug_magnitude
    size = tuple(data_cfg['input_size'][1:])
    dataset = ReferenceTrainDataset(train, ReferenceTrainTransform(size), seed=cfg.seed)
    collate = ReferenceTrainBatch(num_classes=num_classes, magnitude=magnitude, mean=data_cfg['mean'],
                                  std=data_cfg['std'], mixup_alpha=cfg.mixup, label_smoothing=cfg.smoothing)
    return dataset, collate


def _reference_val_size(cfg: TrainConfig, data_cfg: Dict[str, Any], pretrained_cfg: Dict[str, Any]) -> int:
    """The reference validation crop: --val-img-size, else the model's test size when training
    at the model's train size (F0: 192 -> 256, as the paper evaluates), else the training size."""
    if cfg.val_img_size:
        return int(cfg.val_img_size)
    train = tuple(data_cfg['input_size'])
    test = pretrained_cfg.get('test_input_size')
    if test and tuple(pretrained_cfg.get('input_size', ())) == train:
        return int(test[-1])
    return int(train[-1])


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_loader(dataset: Dataset, sampler: EpochSampler, cfg: TrainConfig, device: torch.device,
                 collate: Optional[Callable[[List[Any]], Any]] = None) -> DataLoader:
    """A torch DataLoader driven by ``sampler``: over ``SeededDataset(dataset)`` (augmentations drawn
    from torch's and numpy's global RNGs, seeded per sample), or, with a ``collate`` (the reference
    pipeline), over ``dataset`` itself, which takes each sample's seed from the sampler.

    Args:
        dataset: the dataset.
        sampler: the sampler; its ``batch_size`` is the loader's.
        cfg: the settings (``workers``, capped at the CPUs; ``pin_mem``; ``seed``).
        device: the training device (memory is pinned for CUDA only).
        collate: the batches' collate function, or ``None`` for torch's default.

    Returns:
        The loader (incomplete batches kept: the sampler drops what an epoch does not use).
    """
    workers = max(0, min(cfg.workers, _cpus()))  # more workers than CPUs only slows down
    return DataLoader(
        SeededDataset(dataset) if collate is None else dataset, batch_size=sampler.batch_size, sampler=sampler,
        num_workers=workers, collate_fn=collate,
        pin_memory=cfg.pin_mem and device.type == 'cuda', drop_last=False,
        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(cfg.seed))
