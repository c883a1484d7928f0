"""DeepMind's NFNet (Brock et al. 2021, arXiv:2102.06171), exact to the JAX reference.

One config dataclass (``NfNetCfg``), one block (``NFBlock``), one model (``NFNet``) with timm's
model interface; the variants and their registry entries are in ``nfnet.py``, the speed
paths in ``accel/``. Symbols follow the paper: ``alpha`` (residual scale),
``beta = 1/expected_std`` (block input scale), ``gamma`` (activation gain, folded into the next
conv, see ``layers/conv.py``).

The network is ``NfNetCfg``, ``NFBlock`` and ``NFNet.__init__`` / ``forward_features``; the
rest of the file (over 500 lines with it) is timm's model interface with its documentation.
"""
# No ``from __future__ import annotations`` here: torch.fx copies ``NFNet.forward``'s annotations
# into the code it generates, where a string annotation becomes a name TorchScript cannot resolve
# (timm's fx-then-TorchScript path).
import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import ClassifierHead, get_device_dtype
from timm.models import checkpoint, checkpoint_seq

from ..layers import Activation, SqueezeExcite, StochasticDepthMask, WSConv2d, gamma_of
from .contract import activation_alias, check_input, feature_indices

__all__ = ['NfNetCfg', 'NFBlock', 'NFNet']


IntOrSeq = Union[int, Sequence[int]]


@dataclass(frozen=True)
class NfNetCfg:
    """Architecture of an NFNet; every field is also a ``timm.create_model`` keyword.

    Attributes:
        depths: blocks per stage.
        widths: output channels per stage (one entry per stage).
        strides: stride of each stage's first block, 1 or 2 (one entry per stage).
        group_width: channels per group of the 3x3 convs (per stage if a sequence).
        expansion: bottleneck width as a fraction of the block's width (per stage if a sequence).
        big_width: bottleneck from the block's output width (else its input).
        use_two_convs: NFNet's two grouped 3x3 convs per block (NF-SE-ResNeXt-D: one).
        stem_widths: output channels of stem conv0..conv2 (conv3 has ``widths[0] // 2``).
        alpha: residual branch scale.
        se_ratio: squeeze-excite bottleneck ratio.
        activation: a name of ``layers.GAMMAS``; ``gelu`` is JAX's tanh form.
        final_conv_mult: the final 1x1 conv's width as a multiple of the last stage's.
        drop_rate: dropout before the classifier (train only).
        drop_path_rate: stochastic depth; block ``i`` of ``n`` drops with ``drop_path_rate * i / n``.

    Raises:
        ValueError: per-stage fields whose lengths disagree with ``depths``, depths below 1,
            strides other than 1 or 2, ``stem_widths`` without 3 entries, an unknown
            ``activation``, or drop rates outside [0, 1).
    """
    depths: Tuple[int, ...] = (1, 2, 6, 3)
    widths: Tuple[int, ...] = (256, 512, 1536, 1536)
    strides: Tuple[int, ...] = (1, 2, 2, 2)
    group_width: IntOrSeq = 128
    expansion: IntOrSeq = 0.5
    big_width: bool = True
    use_two_convs: bool = True
    stem_widths: Tuple[int, ...] = (16, 32, 64)
    alpha: float = 0.2
    se_ratio: float = 0.5
    activation: str = 'gelu'
    final_conv_mult: float = 2.0
    drop_rate: float = 0.2
    drop_path_rate: float = 0.0  # the paper trained with 0.25 (the paper recipe's --drop-path)

    def __post_init__(self):
        n = len(self.depths)
        for name in ('widths', 'strides'):
            if len(getattr(self, name)) != n:
                raise ValueError(f'{name} has {len(getattr(self, name))} entries, depths has {n}')
        for name in ('group_width', 'expansion'):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) and len(v) != n:
                raise ValueError(f'{name} has {len(v)} entries, depths has {n}')
        if not all(isinstance(d, int) and d >= 1 for d in self.depths):
            raise ValueError(f'depths must be integers >= 1, got {self.depths}')
        if not all(s in (1, 2) for s in self.strides):
            # the shortcut's 2x2 average pool and the 'SAME' stride-2 convs assume 1 or 2
            raise ValueError(f'strides must each be 1 or 2, got {self.strides}')
        if len(self.stem_widths) != 3:
            raise ValueError(f'stem_widths needs 3 entries (conv0..conv2; conv3 has widths[0] // 2), '
                             f'got {self.stem_widths}')
        gamma_of(self.activation)  # validates the name
        if not 0.0 <= self.drop_rate < 1.0 or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError('drop_rate and drop_path_rate must be in [0, 1)')

    def per_stage(self, name: str) -> List[Any]:
        """A field that may be one value or one per stage, as a per-stage list.

        Args:
            name: the field, e.g. ``'group_width'`` or ``'expansion'``.

        Returns:
            One value per stage (the scalar repeated, or the sequence as a list).
        """
        v = getattr(self, name)
        return [v] * len(self.depths) if isinstance(v, (int, float)) else list(v)


CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(NfNetCfg))


class NFBlock(nn.Module):
    """NFNet block: ``alpha * skip_gain * 2 * SE(f(act(x) * beta)) + shortcut``.

    The residual branch is conv0 1x1 -> conv1 3x3 grouped (strided) -> [conv1b 3x3 grouped]
    -> conv2 1x1, each conv fed by the activation of the previous output. The shortcut is ``x``,
    or a 1x1 conv of ``act(x) * beta`` (after a 2x2 'SAME' average pool when strided).

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: stride of the first 3x3 conv (and of the shortcut's pool), 1 or 2.
        beta: the reference's ``1 / expected_std`` of the block's input.
        alpha: residual branch scale.
        group_width: channels per group of the 3x3 convs.
        expansion: bottleneck width as a fraction of the block's width.
        big_width: bottleneck from ``out_chs`` (else ``in_chs``).
        use_two_convs: two grouped 3x3 convs (NFNet) instead of one.
        se_ratio: squeeze-excite bottleneck ratio.
        activation: a name of ``layers.GAMMAS``.
        drop_path_rate: stochastic depth rate of this block.
        dilation: dilation of the 3x3 convs after the first.
        first_dilation: dilation of the first 3x3 conv (``dilation`` if None).
        device: where the parameters are created.
        dtype: the parameters' dtype.

    Raises:
        ValueError: the bottleneck is narrower than ``group_width``, or an unknown ``activation``.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            *,
            stride: int,
            beta: float,
            alpha: float,
            group_width: int,
            expansion: float,
            big_width: bool,
            use_two_convs: bool,
            se_ratio: float,
            activation: str,
            drop_path_rate: float,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            device: Optional[Union[torch.device, str]] = None,
            dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        gamma = gamma_of(activation)
        width = int((out_chs if big_width else in_chs) * expansion)
        groups = width // group_width
        if groups < 1:
            raise ValueError(f'bottleneck width {width} is narrower than group_width {group_width}')
        width = group_width * groups
        self.beta, self.alpha = beta, alpha
        self.act_in = Activation(activation)  # its input is also the identity shortcut: never in place
        self.act = Activation(activation, inplace=True)  # on conv outputs nothing else reads
        first_dilation = dilation if first_dilation is None else first_dilation
        transition = stride > 1 or in_chs != out_chs or dilation != first_dilation
        self.pool = None
        if stride > 1:  # 'SAME' 2x2/2 avg pool == ceil_mode pooling that divides by the valid count
            self.pool = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
        elif transition and dilation > 1:  # a stride turned into dilation: timm's 2x2/1 zero-padded pool
            self.pool = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.AvgPool2d(2, 1))
        self.conv_shortcut = None
        if transition:
            self.conv_shortcut = WSConv2d(in_chs, out_chs, 1, input_scale=gamma * beta, **dd)
        self.conv0 = WSConv2d(in_chs, width, 1, input_scale=gamma * beta, **dd)
        # with output_stride, a stage's stride becomes dilation (timm's rule: the stage's first 3x3
        # keeps the previous dilation, the convs after it take the new one)
        self.conv1 = WSConv2d(width, width, 3, stride=stride, groups=groups, input_scale=gamma, dilation=first_dilation,
                              **dd)
        self.conv1b = WSConv2d(width, width, 3, groups=groups, input_scale=gamma,
                               dilation=dilation, **dd) if use_two_convs else None
        self.conv2 = WSConv2d(width, out_chs, 1, input_scale=gamma, **dd)
        self.se = SqueezeExcite(out_chs, se_ratio, **dd)
        self.drop_path = StochasticDepthMask(drop_path_rate)
        self.skip_gain = nn.Parameter(torch.zeros((), **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Runs the block.

        Args:
            x: an NCHW feature map with ``in_chs`` channels.

        Returns:
            The block's output, ``out_chs`` channels, spatially reduced by ``stride``.
        """
        out = self.act_in(x)  # gamma * beta live in conv0 / conv_shortcut
        if self.conv_shortcut is None:
            shortcut = x
        elif self.pool is not None:
            shortcut = self.conv_shortcut(self.pool(out))
        else:
            shortcut = self.conv_shortcut(out)
        out = self.conv0(out)
        out = self.conv1(self.act(out))
        if self.conv1b is not None:
            out = self.conv1b(self.act(out))
        out = self.conv2(self.act(out))
        # 2 * SE gate, stochastic depth mask, skip gain and alpha are all per-(sample, channel):
        # multiply them first, then touch the feature map once (out * scale + shortcut).
        scale = self.se(out) * (self.skip_gain * (2.0 * self.alpha))
        mask = self.drop_path(out)
        if mask is not None:
            scale = scale * mask
        return torch.addcmul(shortcut, out, scale[:, :, None, None])


class NFNet(nn.Module):
    """Normalizer-Free Network (DeepMind's ``NFNet``) with timm's model interface.

    Args:
        cfg: the architecture; defaults to NFNet-F0's.
        num_classes: classifier outputs (0 for none).
        in_chans: input channels.
        global_pool: timm pooling type of the head ('avg' is the reference).
        output_stride: None (the architecture's own strides), or 32 / 16 / 8: the strides of the
            stages beyond it become dilation (timm's ``output_stride``; 32 changes only
            configs whose total stride is larger).
        device: where the parameters are created (e.g. ``'cuda'``, or ``'meta'`` for shapes
            only), as timm's ``create_model(..., device=...)``; the default device if None.
        dtype: the parameters' dtype (e.g. ``torch.bfloat16``); the default dtype if None.
        **overrides: any ``NfNetCfg`` field (widths, depths, group_width, use_two_convs,
            activation, alpha, se_ratio, drop_rate, drop_path_rate, ...).

    ``min_input_size`` is the network's total stride (32 for F0): below it the deepest stages
    see only padding.

    Raises:
        TypeError: an unknown keyword in ``overrides``, or a timm ``act_layer`` that is not a
            name or disagrees with ``activation``.
        ValueError: an invalid architecture (see :class:`NfNetCfg`), an ``output_stride`` other
            than None, 8, 16 or 32, or a bottleneck narrower than its ``group_width``.
    """

    def __init__(
            self,
            cfg: Optional[NfNetCfg] = None,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = 'avg',
            output_stride: Optional[int] = None,
            device: Optional[Union[torch.device, str]] = None,
            dtype: Optional[torch.dtype] = None,
            **overrides: Any,
    ):
        super().__init__()
        overrides = activation_alias(overrides)
        unknown = sorted(set(overrides) - CFG_FIELDS)
        if unknown:
            raise TypeError(
                f'unknown NFNet argument(s) {unknown}; architecture keywords are {sorted(CFG_FIELDS)}, '
                'plus num_classes, in_chans, global_pool, output_stride, device, dtype')
        dd = dict(device=device, dtype=dtype)
        overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        cfg = dataclasses.replace(cfg or NfNetCfg(), **overrides)
        self.cfg = cfg
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = cfg.drop_rate
        self.grad_checkpointing = False
        gamma = gamma_of(cfg.activation)

        s0, s1, s2 = cfg.stem_widths
        stem_out = cfg.widths[0] // 2
        self.stem = nn.Sequential(OrderedDict([
            ('conv0', WSConv2d(in_chans, s0, 3, stride=2, **dd)),
            ('act0', Activation(cfg.activation, inplace=True)),
            ('conv1', WSConv2d(s0, s1, 3, input_scale=gamma, **dd)),
            ('act1', Activation(cfg.activation, inplace=True)),
            ('conv2', WSConv2d(s1, s2, 3, input_scale=gamma, **dd)),
            ('act2', Activation(cfg.activation)),  # its input is the stride-2 feature tap
            ('conv3', WSConv2d(s2, stem_out, 3, stride=2, input_scale=gamma, **dd)),
        ]))
        self.feature_info = [dict(num_chs=s2, reduction=2, module='stem.conv2')]

        num_blocks, index, expected_std = sum(cfg.depths), 0, 1.0
        if output_stride not in (None, 8, 16, 32):
            raise ValueError(f'output_stride must be 8, 16 or 32, got {output_stride!r}')
        in_chs, reduction, dilation, stages = stem_out, 4, 1, []
        stage_args = zip(cfg.depths, cfg.widths, cfg.strides, cfg.per_stage('group_width'), cfg.per_stage('expansion'))
        for stage_idx, (depth, width, stride, group_width, expansion) in enumerate(stage_args):
            blocks, first_dilation = [], dilation
            if output_stride is not None and reduction * stride > output_stride:
                dilation, stride = dilation * stride, 1
            for block_idx in range(depth):
                blocks.append(NFBlock(
                    in_chs, width,
                    stride=stride if block_idx == 0 else 1,
                    dilation=dilation,
                    first_dilation=first_dilation if block_idx == 0 else dilation,
                    beta=1.0 / expected_std,
                    alpha=cfg.alpha,
                    group_width=group_width,
                    expansion=expansion,
                    big_width=cfg.big_width,
                    use_two_convs=cfg.use_two_convs,
                    se_ratio=cfg.se_ratio,
                    activation=cfg.activation,
                    drop_path_rate=cfg.drop_path_rate * index / num_blocks,
                    **dd,
                ))
                in_chs, index = width, index + 1
                if block_idx == 0:
                    expected_std = 1.0  # a stage's first block resets the variance (projection shortcut)
                expected_std = (expected_std ** 2 + cfg.alpha ** 2) ** 0.5
            reduction *= stride
            self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f'stages.{stage_idx}'))
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.min_input_size = reduction

        self.num_features = self.head_hidden_size = int(cfg.final_conv_mult * in_chs)
        self.final_conv = WSConv2d(in_chs, self.num_features, 1, **dd)
        self.final_act = Activation(cfg.activation, scale=gamma)
        self.feature_info[-1] = dict(num_chs=self.num_features, reduction=reduction, module='final_conv')
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=cfg.drop_rate,
                                   **dd)
        self._init_classifier()

    def _init_classifier(self) -> None:
        fc = self.head.fc
        if isinstance(fc, nn.Linear):  # the reference's N(0, 0.01), zero bias
            nn.init.normal_(fc.weight, 0.0, 0.01)
            nn.init.zeros_(fc.bias)

    # --- timm model contract -------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter-name patterns of the stem and blocks, for timm's layer-wise LR decay.

        Args:
            coarse: one group per stage instead of one per block.

        Returns:
            timm's matcher dict: ``stem`` and ``blocks`` regexes (``final_conv`` is last).
        """
        return dict(
            stem=r'^stem',
            blocks=[(r'^stages\.(\d+)' if coarse else r'^stages\.(\d+)\.(\d+)', None), (r'^final_conv', (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turns activation checkpointing of the stages on or off (used in training only).

        Args:
            enable: checkpoint each stage's forward.
        """
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> Set[str]:
        """Gains, biases and skip gains: the reference decays only conv, SE and classifier weights.

        Returns:
            The names of the parameters to exclude from weight decay.
        """
        return {n for n, _ in self.named_parameters() if n.endswith(('.gain', '.bias', 'skip_gain'))}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier layer.

        Returns:
            The head's ``fc`` (an ``nn.Identity`` when ``num_classes`` is 0).
        """
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replaces the classifier with a new one, initialised as the reference's (N(0, 0.01), zero bias).

        Args:
            num_classes: outputs of the new classifier (0 for none: ``forward`` returns pooled features).
            global_pool: a new timm pooling type, or None to keep the current one.
        """
        self.num_classes = num_classes
        # on the model's device and in its dtype (the head alone has none once its fc is gone)
        self.head.reset(num_classes, global_pool, **get_device_dtype(self))
        self._init_classifier()

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming what is wrong with an input batch.

        Args:
            x: the input batch.

        Raises:
            ValueError: ``x`` is not NCHW, has other than ``in_chans`` channels, or is smaller
                than ``min_input_size``.
        """
        check_input(x, self.in_chans, self.min_input_size)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Features at each stride: index 0 is the stem at stride 2 (stem.conv2, before its
        activation), 1..4 the stage outputs; the last is taken after final_conv (before its
        activation), as in timm's NFNets.

        Args:
            x: the input batch, NCHW.
            indices: which taps: None for all, an int ``n`` for the last ``n``, or a list of
                indices (negative ones count from the end).
            norm: unused (NFNets have no final norm); accepted for timm's interface.
            stop_early: stop after the deepest stage that is taken.
            output_fmt: only ``'NCHW'``.
            intermediates_only: return only the intermediate features.

        Returns:
            The list of intermediate features if ``intermediates_only``, else a tuple of the
            final feature map (as :meth:`forward_features` gives it, unless ``stop_early`` cut
            the network short) and that list.

        Raises:
            ValueError: ``output_fmt`` is not NCHW, an index is out of range, or the input is
                invalid (see :meth:`check_input`).
        """
        if output_fmt != 'NCHW':
            raise ValueError(f'output_fmt must be NCHW, got {output_fmt!r}')
        self.check_input(x)
        num_stages = len(self.stages)
        take_indices, max_index = feature_indices(num_stages + 1, indices)
        intermediates = []
        stages = self.stages if not stop_early else self.stages[:max_index]
        for name, module in self.stem.named_children():
            x = module(x)
            if name == 'conv2' and 0 in take_indices:
                intermediates.append(x)
        for idx, stage in enumerate(stages, start=1):
            x = checkpoint(stage, x) if self.grad_checkpointing and self.training else stage(x)
            if idx == num_stages:
                x = self.final_conv(x)
            if idx in take_indices:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        if len(stages) == num_stages:
            x = self.final_act(x)
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Removes the layers after the deepest tap in ``indices`` (and the head), in place.

        Args:
            indices: the taps to keep, as in :meth:`forward_intermediates`.
            prune_norm: unused (NFNets have no final norm); accepted for timm's interface.
            prune_head: also remove the classifier (always removed when layers are pruned).

        Returns:
            The absolute indices of the kept taps.

        Raises:
            ValueError: an index out of range, or none selected.
        """
        take_indices, max_index = feature_indices(len(self.stages) + 1, indices)
        prune_end = max_index < len(self.stages)
        if prune_end:
            self.final_conv = nn.Identity()
            self.final_act = nn.Identity()
            self.num_features = self.head_hidden_size = self.feature_info[max_index]['num_chs']
        if max_index == 0:
            self.stem = self.stem[:5]  # up to stem.conv2, the stride-2 tap
        self.stages = self.stages[:max_index]
        self.min_input_size = self.feature_info[max_index]['reduction']
        if prune_head or prune_end:
            self.head.reset(0, '')
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, stages, final conv and its (gamma-scaled) activation: the map before pooling.

        Args:
            x: the input batch, NCHW.

        Returns:
            The final feature map, ``num_features`` channels at the network's total stride.

        Raises:
            ValueError: an invalid input (see :meth:`check_input`).
        """
        self.check_input(x)
        x = self.stem(x)
        if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.final_act(self.final_conv(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooling, dropout and classifier.

        Args:
            x: a feature map from :meth:`forward_features`.
            pre_logits: return the pooled features instead of the logits.

        Returns:
            The logits ``(N, num_classes)``, or the pooled features ``(N, num_features)``.
        """
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classifies a batch.

        Args:
            x: the input batch, NCHW.

        Returns:
            The logits ``(N, num_classes)`` (pooled features when ``num_classes`` is 0).

        Raises:
            ValueError: an invalid input (see :meth:`check_input`).
        """
        return self.forward_head(self.forward_features(x))


