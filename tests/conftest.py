import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # the Hub is unreachable here; never wait on retries

import timm  # noqa: E402
import timm_nfnet_ext  # noqa: E402,F401  (registers the models)

if os.environ.get('TIMM_NFNET_TEST_INSTALLED'):  # CI: the installed wheel, never the source tree
    _src = Path(__file__).resolve().parents[1]
    for _mod, _folder in ((timm_nfnet_ext, 'timm_nfnet_ext'), (__import__('timm_nfnet_hub'), 'hub')):
        if Path(_mod.__file__).resolve().is_relative_to(_src / _folder):
            raise RuntimeError(f'tests imported {_mod.__name__} from the source tree ({_mod.__file__}), '
                               'not from the installed package')

FIXTURES = Path(__file__).parent / 'fixtures' / 'dm_reference'
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def fixture_spec(name: str) -> dict:
    return json.loads((FIXTURES / name / 'spec.json').read_text())


def fixture_model_kwargs(name: str) -> dict:
    """create_model keywords for a fixture's architecture, from its spec.json."""
    spec = fixture_spec(name)
    return dict(widths=spec['width'], depths=spec['depth'], group_width=spec['group_width'],
                num_classes=spec['num_classes'], drop_rate=spec['drop_rate'], **spec['kwargs'])


def fixture_arrays(name: str):
    d = FIXTURES / name
    return (torch.from_numpy(np.load(d / 'input.npy')), np.load(d / 'logits.npy'), np.load(d / 'pool.npy'))


def tiny_model(**kwargs) -> torch.nn.Module:
    """A small NFNet (the tiny fixture architecture) for fast contract tests."""
    args = dict(widths=(64, 128, 192, 192), depths=(1, 2, 2, 1), group_width=32, num_classes=10)
    args.update(kwargs)
    return timm.create_model('nfnet_f0', **args)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
