"""Names shared by ``timm_nfnet_ext`` and this package, in a module that imports nothing heavy
(reading a manifest or listing releases must not import torch)."""
import re

__all__ = ['NAMESPACE_ENV', 'TAG_PATTERN']

# The Hub user or organisation that the pretrained cfgs point at (timm_nfnet_ext.models.nfnet)
# and that `timm-nfnet-hub publish` writes to.
NAMESPACE_ENV = 'TIMM_NFNET_HUB_NAMESPACE'

# A pretrained tag (the part after the dot of `nfnet_f0.dm_in1k`), as timm-nfnet-convert --tag takes it.
TAG_PATTERN = re.compile(r'^[a-z0-9_]+$')
