"""timm-nfnet-ext: DeepMind's Normalizer-Free Networks for timm.

Importing this package registers the models (``nfnet_f0`` ... ``nfnet_f7``, the wide
``nfnet_f*_plus`` variants and the NF-SE-ResNeXt-D family) in timm's model registry, and the
AGC optimizers (``sgdagc``, ``adamwagc``, ``lambagc``, ...) in timm's optimizer registry.

Layout: ``variants.py`` (the table of variant facts), ``models/`` (the network and its registry
entries), ``layers/`` (its layers), ``accel/`` (speed paths, attached by ``accel.accelerate``),
``agc/`` (adaptive gradient clipping), ``weights/`` (checkpoints and conversion), ``data/``
(the reference input pipelines), ``train/`` (``timm-nfnet-train``), ``validate.py``
(``timm-nfnet-validate``).
"""
__version__ = '0.1.0'

from .weights import CheckpointError, UnsafeCheckpointError, checkpoint_filter_fn, load_checkpoint_file, read_deepmind_pickle
from .agc import (
    AGCMixin,
    AdamWAGC,
    LambAGC,
    SGDAGC,
    adaptive_clip_grad_,
    agc_param_groups,
    register_agc_optimizer,
    unitwise_norm,
    with_agc,
)
from .data import FileImageDataset, ImageDecodeError, ReferenceEvalTransform, create_eval_transform
from .layers import GAMMAS, WSConv2d
from .models import MODEL_CFGS, NFBlock, NFNet, NfNetCfg
from .accel import accelerate, prepack_for_cpu

__all__ = [
    'NFNet', 'NFBlock', 'NfNetCfg', 'MODEL_CFGS', 'WSConv2d', 'GAMMAS', 'accelerate', 'prepack_for_cpu',
    'CheckpointError', 'UnsafeCheckpointError', 'checkpoint_filter_fn', 'load_checkpoint_file', 'read_deepmind_pickle',
    'SGDAGC', 'AdamWAGC', 'LambAGC', 'AGCMixin', 'with_agc', 'adaptive_clip_grad_', 'agc_param_groups',
    'register_agc_optimizer', 'unitwise_norm',
    'create_eval_transform', 'ReferenceEvalTransform', 'FileImageDataset', 'ImageDecodeError',
]
