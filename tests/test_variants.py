"""The one table of variant facts (timm_nfnet_ext.variants) and everything that reads it."""
import re
from pathlib import Path

import pytest
import timm
import torch

from timm_nfnet_ext.models import MODEL_CFGS
from timm_nfnet_ext.variants import F_VARIANTS, reference_crop_pct, variant_of

DOCS = Path(__file__).resolve().parents[1] / 'docs'


@pytest.mark.parametrize('v', F_VARIANTS, ids=lambda v: v.name)
def test_models_and_pretrained_cfgs_follow_the_table(v):
    assert v.depths == tuple(d * (v.index + 1) for d in (1, 2, 6, 3))
    with torch.device('meta'):
        n = sum(p.numel() for p in timm.create_model(v.name).parameters())
    assert round(n / 1e6, 1) == v.params_m
    for name in (v.name, f'{v.name}_plus') + ((f'nf_seresnextd_f{v.index}',) if v.index < 4 else ()):
        assert MODEL_CFGS[name].depths == v.depths and MODEL_CFGS[name].drop_rate == v.drop_rate
        cfg = timm.models.get_pretrained_cfg(name)
        assert cfg.input_size[-1] == v.train_size and cfg.test_input_size[-1] == v.test_size
        assert cfg.test_crop_pct == reference_crop_pct(v.test_size) == v.test_size / (v.test_size + 32)
        assert variant_of(name) is v
    assert (timm.models.get_pretrained_cfg(v.name).tag == 'dm_in1k') == (v.top1 is not None)


def test_docs_release_table_is_the_variant_table():
    rows = re.findall(r'^\| F(\d)[^|]*\|[^|]*\|[^|]*\| (\d+) / (\d+) \| ([\d.]+)M \| ([\d.]+) \| ([\d.]+) \|$',
                      (DOCS / 'weights.md').read_text(), flags=re.M)
    assert len(rows) == 7
    for i, train, test, params, top1, top5 in rows:
        v = F_VARIANTS[int(i)]
        assert (int(train), int(test), float(params), float(top1), float(top5)) == \
            (v.train_size, v.test_size, v.params_m, v.top1, v.top5)


def test_variant_of_names():
    assert variant_of('nfnet_f3.dm_in1k').index == 3 and variant_of('nf_seresnextd_f1').index == 1
    assert variant_of('nfnet_f2_plus').index == 2
    assert variant_of('nf_seresnext50d') is None and variant_of('resnet50') is None
