"""The reference's stochastic depth (``StochDepth``), as a per-sample mask."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

__all__ = ['StochasticDepthMask']


class StochasticDepthMask(nn.Module):
    """Per-sample keep mask ``floor(keep + U[0, 1))``, with NO ``1/keep`` rescale (timm's
    ``DropPath`` rescales; the reference does not, and the released weights were trained so).

    Returns an (N, 1) mask in training and ``None`` at eval or rate 0, so that the block folds
    it into its per-channel output scale instead of spending a pass over the feature map.

    Args:
        rate: drop probability, in [0, 1).

    Raises:
        ValueError: ``rate`` outside [0, 1).
    """

    def __init__(self, rate: float = 0.0):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f'stochastic depth rate must be in [0, 1), got {rate}')
        self.rate = rate

    def forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """Draws the per-sample keep mask.

        Args:
            x: the batch (only its size, dtype and device are used).

        Returns:
            An (N, 1) mask of 0s and 1s in training, or None at eval or rate 0.
        """
        if not self.training or self.rate == 0.0:
            return None
        keep = 1.0 - self.rate
        # torch.rand's own draw (empty + uniform_), written so torch.fx can trace the batch size
        # (and the size as a list, as TorchScript's new_empty takes it)
        return torch.floor(keep + x.new_empty([x.shape[0], 1]).uniform_())

    def extra_repr(self) -> str:
        """The module's summary in ``repr``.

        Returns:
            ``rate=...``.
        """
        return f'rate={self.rate:.4g}'
