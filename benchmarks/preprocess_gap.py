"""How far each eval transform lands from DeepMind's pipeline, on the test goldens.

For every golden in ``tests/fixtures/dm_preprocessing`` (DeepMind's ``dataset.py`` run in
TensorFlow: real photos from scikit-learn and synthetic JPEGs), prints max and mean |difference|
in normalised units for: timm's default eval transform for ``nfnet_f0`` at that size
(``create_transform(**resolve_model_data_config(model, use_test_size=True))``, at each size with
the reference's crop S / (S + 32)), the reference transform fed a PIL-decoded image (only the decoder differs), and the
reference transform from the file.

    python benchmarks/preprocess_gap.py
"""
from __future__ import annotations

import pathlib

import numpy as np
from PIL import Image

import timm
import timm_nfnet_ext  # noqa: F401
from timm.data import create_transform, resolve_data_config
from timm_nfnet_ext.data import create_eval_transform

FIX = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'fixtures' / 'dm_preprocessing'
PHOTOS = ('china', 'flower')


def source(stem: str) -> pathlib.Path:
    found = sorted((FIX / 'images').glob(stem + '.*'))
    if found:
        return found[0]
    import sklearn.datasets
    return pathlib.Path(sklearn.datasets.__file__).parent / 'images' / f'{stem}.jpg'


def main() -> None:
    cfg = timm.models.get_pretrained_cfg('nfnet_f0').to_dict()
    rows = []
    for name in ('golden_extra.npz', 'golden_shared.npz'):
        golden = np.load(FIX / name)
        for key in sorted(golden.files):
            stem, size = key.split('@')
            size = int(size)
            if not (stem in PHOTOS or name == 'golden_shared.npz'):
                continue
            path = source(stem)
            # timm's transform at this size with the reference's crop (S / (S + 32), squash)
            data_cfg = resolve_data_config({'img_size': size, 'crop_pct': size / (size + 32)},
                                           pretrained_cfg=cfg, use_test_size=True)
            timm_tf = create_transform(**data_cfg)
            ours = create_eval_transform(img_size=size)
            pil = Image.open(path).convert('RGB')
            ref = golden[key]
            gaps = [np.abs(t.numpy() - ref) for t in (timm_tf(pil), ours(pil), ours(path))]
            rows.append((key, 'photo' if stem in PHOTOS else 'synthetic', gaps))
    print('max / mean |difference| from DeepMind\'s pipeline (normalised units)')
    print(f'{"image@size":32s} {"kind":9s} {"timm transform":>18s} {"reference, PIL decode":>22s} {"reference":>18s}')
    for key, kind, gaps in rows:
        cells = ' '.join(f'{g.max():8.4f} / {g.mean():7.4f}' for g in gaps)
        print(f'{key:32s} {kind:9s} {cells}')


if __name__ == '__main__':
    main()
