"""DeepMind's NFNets as timm models: the network (``nfnet.py``) and its registry entries (``registry.py``)."""
from .contract import check_input, feature_indices
from .nfnet import NFBlock, NFNet, NfNetCfg
from .registry import HUB_NAMESPACE_ENV, MODEL_CFGS, default_cfgs, hub_repo_id

__all__ = ['NFNet', 'NFBlock', 'NfNetCfg', 'MODEL_CFGS', 'default_cfgs', 'hub_repo_id', 'HUB_NAMESPACE_ENV',
           'check_input', 'feature_indices']
