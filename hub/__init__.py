"""Publishing NFNet weights to the Hugging Face Hub (installed as ``timm_nfnet_hub``)."""
