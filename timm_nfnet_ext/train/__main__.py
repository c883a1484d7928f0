"""``python -m timm_nfnet_ext.train``: the same as ``timm-nfnet-train``."""
import sys

from .cli import main

sys.exit(main())
