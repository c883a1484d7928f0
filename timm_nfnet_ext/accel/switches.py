"""Process-wide switches of the speed paths (set them with ``timm_nfnet_ext.accel.configure``).

- ``models``: ``timm.create_model`` returns accelerated models (``accel.accelerate``); off, it
  returns the reference classes. Its default comes from ``TIMM_NFNET_ACCEL`` (``0`` turns it off).
- ``gelu``: the hand-written CPU float32 tanh-GELU (``gelu.py``). Its forward saves the
  derivative, so it cannot be differentiated twice: turn it off for double backward on CPU.
- ``weight_std``: the hand-written CPU weight standardisation (``weight_std.py``).
- ``grouped_ws``: weight standardisation in groups (``grouped_ws.py``; per model:
  ``set_grouped_ws``), by default on CUDA only.
- ``sgd``: the chunked SGD update of ``SGDAGC`` on CPU (``sgd.py``).
"""
import os

models: bool = os.environ.get('TIMM_NFNET_ACCEL', '1').strip().lower() not in ('0', 'false', 'off', 'no')
gelu: bool = True
weight_std: bool = True
grouped_ws: bool = True
sgd: bool = True
