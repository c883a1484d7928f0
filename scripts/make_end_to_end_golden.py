#!/usr/bin/env python3
"""End-to-end goldens: JPEG bytes -> DeepMind's eval preprocessing -> DeepMind's NFNet -> logits.

Runs the reference's own code: ``nfnets/dataset.py`` (``_decode_and_resize_then_crop`` with
``crop_pct=32``, ``_normalize_image``) in TensorFlow, then ``nfnets/nfnet.py``'s ``NFNet`` in
JAX/Haiku on the result, with the parameters of a ``tests/fixtures/dm_reference`` architecture.
Writes ``OUT.npz`` with ``logits@<stem>`` (and ``input@<stem>``, NCHW, to localise a failure).

The parameters come as an ``.npz`` of ``'<module>/<param>'`` arrays, made from the fixture's
pickle by this package's safe reader (no pickle is loaded here):

    python -c "import numpy as np; from timm_nfnet_ext.weights.checkpoint import read_deepmind_pickle; \\
        np.savez('/tmp/p.npz', **read_deepmind_pickle('tests/fixtures/dm_reference/tiny_nfnet/params.pkl'))"
    DM_NFNETS_PARENT=<folder holding nfnets/> /tmp/tfenv/bin/python scripts/make_end_to_end_golden.py \\
        /tmp/p.npz tests/fixtures/dm_reference/tiny_nfnet/spec.json OUT.npz IMAGE.jpg ...

Needs tensorflow (CPU), jax and dm-haiku in that environment.
"""
import json
import os
import pathlib
import sys
import types

import numpy as np


class _Stub(types.ModuleType):
    """Stands in for a library dataset.py imports but the eval functions never call."""

    def __getattr__(self, attr):
        if attr.startswith('__'):
            raise AttributeError(attr)
        return _Stub(f'{self.__name__}.{attr}')


for _name in ('tensorflow_datasets', 'tensorflow_probability', 'ml_collections',
              'tensorflow_addons', 'tensorflow_addons.image'):
    sys.modules[_name] = _Stub(_name)
sys.path.insert(0, os.environ['DM_NFNETS_PARENT'])

import haiku as hk  # noqa: E402
import jax  # noqa: E402
import tensorflow as tf  # noqa: E402
from nfnets import base, dataset, nfnet  # noqa: E402


def main() -> None:
    params_npz, spec_json, out = sys.argv[1:4]
    images = sys.argv[4:]
    spec = json.loads(pathlib.Path(spec_json).read_text())
    size = spec['test_imsize']
    base.nfnet_params['fixture'] = dict(width=spec['width'], depth=spec['depth'],
                                        group_width=spec['group_width'],
                                        train_imsize=spec['train_imsize'],
                                        test_imsize=size, drop_rate=spec['drop_rate'])
    flat = np.load(params_npz)
    params = {}
    for key in flat.files:
        module, name = key.rsplit('/', 1)
        params.setdefault(module, {})[name] = flat[key]

    def forward(x):
        net = nfnet.NFNet(num_classes=spec['num_classes'], variant='fixture', **spec['kwargs'])
        return net(x, is_training=False)['logits']

    apply = hk.without_apply_rng(hk.transform(forward)).apply
    arrays = {}
    for path in images:
        raw = tf.constant(pathlib.Path(path).read_bytes())
        img = dataset._decode_and_resize_then_crop(raw, image_size=(size, size), crop_pct=32.0)
        img = dataset._normalize_image(img).numpy().astype(np.float32)
        logits = np.asarray(apply(params, jax.numpy.asarray(img[None])))
        stem = pathlib.Path(path).stem
        arrays[f'logits@{stem}'] = logits[0].astype(np.float32)
        arrays[f'input@{stem}'] = np.transpose(img, (2, 0, 1))
    np.savez_compressed(out, **arrays)
    print(f'{len(images)} images at {size} px -> {out}')


if __name__ == '__main__':
    main()
