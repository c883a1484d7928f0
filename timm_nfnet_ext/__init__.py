"""timm-nfnet-ext: DeepMind's Normalizer-Free Networks for timm.

Importing this package registers the models (``nfnet_f0`` ... ``nfnet_f7``, the wide
``nfnet_f*_plus`` variants and the NF-SE-ResNeXt-D family) in timm's model registry, and the
AGC optimizers (``sgdagc``, ``adamwagc``, ``lambagc``, ...) in timm's optimizer registry.
"""
from . import agc
from .checkpoint import (
    CheckpointError,
    UnsafeCheckpointError,
    checkpoint_filter_fn,
    load_checkpoint_file,
    read_deepmind_pickle,
)
from .layers import GAMMAS, WSConv2d
from .nfnet import MODEL_CFGS, NFBlock, NFNet, NfNetCfg

__version__ = '0.1.0'
