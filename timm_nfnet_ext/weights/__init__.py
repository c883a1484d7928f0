"""NFNet weights: safe reading of the three layouts (``checkpoint.py``) and conversion to
validated safetensors folders (``convert.py``, the ``timm-nfnet-convert`` command)."""
from .checkpoint import (CheckpointError, UnsafeCheckpointError, checkpoint_filter_fn, detect_layout,
                         load_checkpoint_file, native_to_timm, read_deepmind_pickle, timm_to_native)

__all__ = ['CheckpointError', 'UnsafeCheckpointError', 'checkpoint_filter_fn', 'detect_layout', 'load_checkpoint_file',
           'native_to_timm', 'read_deepmind_pickle', 'timm_to_native']
