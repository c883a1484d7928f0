"""The reference's squeeze-and-excitation gate."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['SqueezeExcite']


class SqueezeExcite(nn.Module):
    """Mean over H, W -> Linear -> ReLU (no gamma) -> Linear -> sigmoid: the (N, C) gate.

    The block applies the gate, times 2, to its feature map (the reference's ``2 * SE``).

    Args:
        chs: channels of the feature map.
        se_ratio: hidden width as a fraction of ``chs`` (at least 1 unit).
        device: where the parameters are created.
        dtype: the parameters' dtype.
    """

    def __init__(self, chs: int, se_ratio: float = 0.5, device: Optional[Union[torch.device, str]] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        hidden = max(1, int(chs * se_ratio))
        self.fc1 = nn.Linear(chs, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, chs, device=device, dtype=dtype)
        for fc in (self.fc1, self.fc2):
            # Haiku's Linear default: truncated normal, std 1/sqrt(fan_in), cut at 2 std.
            std = 1.0 / math.sqrt(fc.in_features)
            nn.init.trunc_normal_(fc.weight, 0.0, std, -2 * std, 2 * std)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes the gate.

        Args:
            x: an NCHW feature map with ``chs`` channels.

        Returns:
            The (N, C) gate in (0, 1) (not yet doubled).
        """
        return torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3))))))
