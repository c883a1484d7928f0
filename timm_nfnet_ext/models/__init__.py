"""DeepMind's NFNets as timm models: the network (``network.py``) and its registry entries (``nfnet.py``,
named as timm's own NFNet file, so that ``timm.list_models(module='nfnet')`` lists them)."""
from .contract import check_input, feature_indices
from .network import NFBlock, NFNet, NfNetCfg
from .nfnet import HUB_NAMESPACE_ENV, MODEL_CFGS, default_cfgs, hub_repo_id

__all__ = ['NFNet', 'NFBlock', 'NfNetCfg', 'MODEL_CFGS', 'default_cfgs', 'hub_repo_id', 'HUB_NAMESPACE_ENV',
           'check_input', 'feature_indices']
