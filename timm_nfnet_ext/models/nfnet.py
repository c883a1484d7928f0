"""NFNet variants in timm's registry: architectures, pretrained configs, ``@register_model``.

The variant facts (depths, sizes, dropout, released accuracy) come from the one table in
``variants.py``. Each entry point builds the reference ``NFNet`` with timm's
``build_model_with_cfg`` and attaches the speed paths (``accel.accelerate``): the one place
where they meet the network.
"""
import os
import warnings
from typing import Any, Dict, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm_nfnet_hub.names import NAMESPACE_ENV

from .. import accel
from ..variants import F_VARIANTS, NFNET_WIDTHS, PLUS_WIDTHS, SERESNEXT_WIDTHS, Variant, reference_crop_pct
from ..weights.checkpoint import checkpoint_filter_fn
from .contract import check_input
from .network import NFNet, NfNetCfg

__all__ = ['MODEL_CFGS', 'default_cfgs', 'hub_repo_id', 'HUB_NAMESPACE_ENV']


# --- architectures ---------------------------------------------------------------------------
# Depths, widths and dropout come from the one table of variant facts (variants.py).
MODEL_CFGS: Dict[str, NfNetCfg] = {}
for _v in F_VARIANTS:
    MODEL_CFGS[_v.name] = NfNetCfg(depths=_v.depths, widths=NFNET_WIDTHS, drop_rate=_v.drop_rate)
    MODEL_CFGS[f'{_v.name}_plus'] = NfNetCfg(depths=_v.depths, widths=PLUS_WIDTHS, drop_rate=_v.drop_rate)
for _v in F_VARIANTS[:4]:
    MODEL_CFGS[f'nf_seresnextd_f{_v.index}'] = NfNetCfg(
        depths=_v.depths, widths=SERESNEXT_WIDTHS, use_two_convs=False, drop_rate=_v.drop_rate)
MODEL_CFGS['nf_seresnext50d'] = NfNetCfg(depths=(3, 4, 6, 3), widths=SERESNEXT_WIDTHS, use_two_convs=False)
MODEL_CFGS['nf_seresnext101d'] = NfNetCfg(depths=(3, 4, 23, 3), widths=SERESNEXT_WIDTHS, use_two_convs=False)


def _create_nfnet(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    try:
        model = build_model_with_cfg(
            NFNet,
            variant,
            pretrained,
            model_cfg=MODEL_CFGS[variant],
            pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(flatten_sequential=True),
            **kwargs,
        )
    except Exception as e:
        if pretrained and hasattr(e, 'add_note') and _is_hub_miss(e):
            e.add_note(_hub_miss_note(variant, kwargs))
        raise
    if not isinstance(model, NFNet):  # features_only: timm's wrapper calls our modules directly
        _check_inputs_of(model, kwargs.get('in_chans', 3))
    if accel.switches.models:
        accel.accelerate(model)  # the speed paths attach here (and only here)
    return model


def _check_inputs_of(features: nn.Module, in_chans: int) -> None:
    """The input check of ``forward_features`` for timm's feature wrappers (list/dict/hook/fx),
    as a forward pre-hook; the minimum size is the deepest returned feature's stride."""
    reductions = features.feature_info.reduction()
    if not reductions:
        raise ValueError('features_only: out_indices selects no feature (a tuple of indices into the 5 taps, '
                         'e.g. (1, 2, 3, 4), or an int n for the last n)')
    features.nfnet_in_chans, features.nfnet_min_input_size = in_chans, max(reductions)
    features.register_forward_pre_hook(_check_features_input)


def _check_features_input(module: nn.Module, args: Tuple[torch.Tensor]) -> None:
    """A feature wrapper's forward pre-hook running ``check_input``, with the numbers kept on the
    wrapper: a module-level function, so that the model pickles and TorchScript compiles it."""
    if not torch.jit.is_scripting():
        if not args or not isinstance(args[0], torch.Tensor):
            return  # called with keywords: nothing this hook can see
    check_input(args[0], module.nfnet_in_chans, module.nfnet_min_input_size)


def _is_hub_miss(e: Exception) -> bool:
    from huggingface_hub.utils import EntryNotFoundError, HfHubHTTPError  # (offline misses are EntryNotFound)
    return isinstance(e, (EntryNotFoundError, HfHubHTTPError))


def _hub_miss_note(variant: str, kwargs: Dict[str, Any]) -> str:
    """What a failed weight download was after: huggingface_hub's own message names neither
    the repo nor the offline setting."""
    from timm.models import resolve_pretrained_cfg
    try:
        cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay'))
        where = f'{cfg.hf_hub_id}/{cfg.hf_hub_filename or "model.safetensors"}'
    except Exception:  # the note must never hide the original error
        where = 'its Hub repo'
    from huggingface_hub import constants
    note = f'timm_nfnet_ext: pretrained weights of {variant}: could not fetch {where}.'
    if constants.HF_HUB_OFFLINE:
        note += ' HF_HUB_OFFLINE is set and the file is not in the Hugging Face cache.'
    return note


# --- pretrained configs ------------------------------------------------------------------------
PAPER = 'High-Performance Large-Scale Image Recognition Without Normalization'


def _cfg(train_px: int = 224, test_px: int = 256, **kwargs: Any) -> Dict[str, Any]:
    """Reference preprocessing: bicubic squash-resize to S+32, centre crop S, ImageNet mean/std."""
    return {
        'num_classes': 1000,
        'input_size': (3, train_px, train_px),
        'test_input_size': (3, test_px, test_px),
        'pool_size': (-(-train_px // 32), -(-train_px // 32)),
        # resize S+32, crop S at either size: the reference's rule at the test size, and the same
        # rule at the train size (one crop_pct for both would resize to 216, not 224, at 192 px)
        'crop_pct': reference_crop_pct(train_px),
        'test_crop_pct': reference_crop_pct(test_px),
        'crop_mode': 'squash',
        'interpolation': 'bicubic',
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem.conv0',
        'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'arXiv:2102.06171',
        'paper_name': PAPER,
        'origin_url': 'https://github.com/google-deepmind/deepmind-research/tree/master/nfnets',
        **kwargs,
    }


HUB_NAMESPACE_ENV = NAMESPACE_ENV


def hub_repo_id(arch: str, tag: str = 'dm_in1k') -> str:
    """Where ``arch.tag``'s weights are downloaded from.

    By default the copies timm hosts of DeepMind's weights (``timm/dm_nfnet_f0.dm_in1k``, timm's
    layout, converted on load). With ``TIMM_NFNET_HUB_NAMESPACE=ORG`` set before import, every
    cfg points at ``ORG/<arch>.<tag>``, the repos ``timm-nfnet-hub publish`` writes.

    Args:
        arch: the model name, e.g. ``nfnet_f0``.
        tag: the pretrained tag.

    Returns:
        The Hugging Face Hub repo id.
    """
    namespace = os.environ.get(HUB_NAMESPACE_ENV, '').strip()
    return f'{namespace}/{arch}.{tag}' if namespace else f'timm/dm_{arch}.{tag}'


def _sizes(v: Variant) -> Tuple[int, int]:
    return v.train_size, v.test_size


def _weights_cfg(v: Variant) -> Dict[str, Any]:
    # named explicitly, so timm loads model.safetensors and never falls back to a pickled
    # pytorch_model.bin (and an offline miss names the file that is missing)
    return _cfg(*_sizes(v), hf_hub_id=hub_repo_id(v.name), hf_hub_filename='model.safetensors')


default_cfgs = generate_default_cfgs({
    **{f'{v.name}.dm_in1k' if v.top1 is not None else v.name:
       _weights_cfg(v) if v.top1 is not None else _cfg(*_sizes(v)) for v in F_VARIANTS},
    **{f'{v.name}_plus': _cfg(*_sizes(v)) for v in F_VARIANTS},
    **{f'nf_seresnextd_f{v.index}': _cfg(*_sizes(v)) for v in F_VARIANTS[:4]},
    'nf_seresnext50d': _cfg(224, 256),
    'nf_seresnext101d': _cfg(224, 256),
})


# --- entry points --------------------------------------------------------------------------------
# timm registers weightless `nfnet_f0..f7` of its own; these replace them on purpose (timm's
# `dm_nfnet_*` are left alone), so the "Overwriting ... in registry" warnings are silenced.
with warnings.catch_warnings():
    warnings.filterwarnings('ignore', message=r'Overwriting nfnet_f\d in registry')

    @register_model
    def nfnet_f0(pretrained: bool = False, **kwargs: Any) -> NFNet:
        """NFNet-F0 with DeepMind's weights (``dm_in1k``; sizes, accuracy: ``variants.py``)."""
        return _create_nfnet('nfnet_f0', pretrained, **kwargs)

    @register_model
    def nfnet_f1(pretrained: bool = False, **kwargs: Any) -> NFNet:
        """NFNet-F1 with DeepMind's weights (``dm_in1k``; sizes, accuracy: ``variants.py``)."""
        return _create_nfnet('nfnet_f1', pretrained, **kwargs)

    @register_model
    def nfnet_f2(pretrained: bool = False, **kwargs: Any) -> NFNet:
        """NFNet-F2 with DeepMind's weights (``dm_in1k``; sizes, accuracy: ``variants.py``)."""
        return _create_nfnet('nfnet_f2', pretrained, **kwargs)

    @register_model
    def nfnet_f3(pretrained: bool = False, **kwargs: Any) -> NFNet:
        """NFNet-F3 with DeepMind's weights (``dm_in1k``; sizes, accuracy: ``variants.py``)."""
        return _create_nfnet('nfnet_f3', pretrained, **kwargs)

    @register_model
    def nfnet_f4(pretrained: bool = False, **kwargs: Any) -> NFNet:
        """NFNet-F4 with DeepMind's weights (``dm_in1k``; sizes, accuracy: ``variants.py``)."""
        return _create_nfnet('nfnet_f4', pretrained, **kwargs)

    @register_model
    def nfnet_f5(pretrained: bool = False, **kwargs: Any) -> NFNet:
        """NFNet-F5 with DeepMind's weights (``dm_in1k``; sizes, accuracy: ``variants.py``)."""
        return _create_nfnet('nfnet_f5', pretrained, **kwargs)

    @register_model
    def nfnet_f6(pretrained: bool = False, **kwargs: Any) -> NFNet:
        """NFNet-F6 with DeepMind's weights, trained with SAM (``dm_in1k``; facts: ``variants.py``)."""
        return _create_nfnet('nfnet_f6', pretrained, **kwargs)

    @register_model
    def nfnet_f7(pretrained: bool = False, **kwargs: Any) -> NFNet:
        """NFNet-F7 (no weights were released)."""
        return _create_nfnet('nfnet_f7', pretrained, **kwargs)


@register_model
def nfnet_f0_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NFNet-F0+: F0 depths, widths 384/768/2048/2048 (no released weights)."""
    return _create_nfnet('nfnet_f0_plus', pretrained, **kwargs)


@register_model
def nfnet_f1_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NFNet-F1+ (no released weights)."""
    return _create_nfnet('nfnet_f1_plus', pretrained, **kwargs)


@register_model
def nfnet_f2_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NFNet-F2+ (no released weights)."""
    return _create_nfnet('nfnet_f2_plus', pretrained, **kwargs)


@register_model
def nfnet_f3_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NFNet-F3+ (no released weights)."""
    return _create_nfnet('nfnet_f3_plus', pretrained, **kwargs)


@register_model
def nfnet_f4_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NFNet-F4+, the paper's JFT-300M model (no released weights)."""
    return _create_nfnet('nfnet_f4_plus', pretrained, **kwargs)


@register_model
def nfnet_f5_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NFNet-F5+ (no released weights)."""
    return _create_nfnet('nfnet_f5_plus', pretrained, **kwargs)


@register_model
def nfnet_f6_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NFNet-F6+ (no released weights)."""
    return _create_nfnet('nfnet_f6_plus', pretrained, **kwargs)


@register_model
def nfnet_f7_plus(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NFNet-F7+ (no released weights)."""
    return _create_nfnet('nfnet_f7_plus', pretrained, **kwargs)


@register_model
def nf_seresnextd_f0(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NF-SE-ResNeXt-D at F0 depths: the paper's Table 2 baseline."""
    return _create_nfnet('nf_seresnextd_f0', pretrained, **kwargs)


@register_model
def nf_seresnextd_f1(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NF-SE-ResNeXt-D at F1 depths: the paper's Table 2 baseline."""
    return _create_nfnet('nf_seresnextd_f1', pretrained, **kwargs)


@register_model
def nf_seresnextd_f2(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NF-SE-ResNeXt-D at F2 depths: the paper's Table 2 baseline."""
    return _create_nfnet('nf_seresnextd_f2', pretrained, **kwargs)


@register_model
def nf_seresnextd_f3(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NF-SE-ResNeXt-D at F3 depths: the paper's Table 2 baseline."""
    return _create_nfnet('nf_seresnextd_f3', pretrained, **kwargs)


@register_model
def nf_seresnext50d(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NF-SE-ResNeXt-50-D: depths 3,4,6,3 with the NF-SE-ResNeXt-D block."""
    return _create_nfnet('nf_seresnext50d', pretrained, **kwargs)


@register_model
def nf_seresnext101d(pretrained: bool = False, **kwargs: Any) -> NFNet:
    """NF-SE-ResNeXt-101-D: depths 3,4,23,3 with the NF-SE-ResNeXt-D block."""
    return _create_nfnet('nf_seresnext101d', pretrained, **kwargs)
