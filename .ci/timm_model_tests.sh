#!/usr/bin/env bash
# timm's own model test suite (tests/test_models.py from the sdist of the installed timm) on this
# package's models: nfnet_f0, the smallest NF-SE-ResNeXt-D and one "+" model. `-p timm_nfnet_ext`
# imports the package as a pytest plugin, so the models are registered before timm's test file
# builds its model lists. Two checks are deselected: test_model_load_pretrained and
# test_model_features_pretrained download weights from the Hugging Face Hub, which CI cannot reach.
set -euo pipefail
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
version=$(python -c 'import timm; print(timm.__version__)')
python -m pip download -q --no-deps --no-binary :all: "timm==$version" -d "$work"
tar xzf "$work/timm-$version.tar.gz" -C "$work"
rm -rf "$work/timm-$version/timm"  # test the installed timm, not the sdist's copy
cd "$work/timm-$version"
models='1-nfnet_f0] or 2-nfnet_f0] or 1-nfnet_f0.dm_in1k] or [nfnet_f0] or 1-nf_seresnextd_f0] or 2-nf_seresnextd_f0] or [nf_seresnextd_f0] or 1-nfnet_f0_plus] or 2-nfnet_f0_plus] or [nfnet_f0_plus]'
HF_HUB_OFFLINE=1 python -m pytest -q -p timm_nfnet_ext -p no:cacheprovider tests/test_models.py \
    -k "($models) and not pretrained" -W ignore::pytest.PytestUnknownMarkWarning
