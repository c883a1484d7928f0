"""The model card (README.md) of a published release: Hub metadata header, then a description.

The text is deterministic: the same release and source give byte-identical cards, so publishing
again without a change makes no new commit.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

from huggingface_hub import EvalResult, ModelCardData

from .manifest import Release

__all__ = ['render_card', 'PAPER_URL', 'CITATION']

PAPER_TITLE = 'High-Performance Large-Scale Image Recognition Without Normalization'
PAPER_URL = 'https://arxiv.org/abs/2102.06171'
CODE_URL = 'https://github.com/google-deepmind/deepmind-research/tree/master/nfnets'
CITATION = """@article{brock2021high,
  author={Andrew Brock and Soham De and Samuel L. Smith and Karen Simonyan},
  title={High-Performance Large-Scale Image Recognition Without Normalization},
  journal={arXiv preprint arXiv:2102.06171},
  year={2021}
}"""


def _eval_results(release: Release) -> List[EvalResult]:
    dataset_name = 'ImageNet-1k' if release.dataset == 'imagenet-1k' else release.dataset
    common = dict(task_type='image-classification', task_name='Image Classification',
                  dataset_type=release.dataset, dataset_name=dataset_name, dataset_split='validation')
    if release.from_deepmind:  # the accuracy DeepMind published; a custom release's is its own claim
        common.update(source_name=PAPER_TITLE, source_url=PAPER_URL)
    results = []
    if release.top1 is not None:
        results.append(EvalResult(metric_type='accuracy', metric_name='Top-1 accuracy',
                                  metric_value=release.top1, **common))
    if release.top5 is not None:
        results.append(EvalResult(metric_type='top_5_accuracy', metric_name='Top-5 accuracy',
                                  metric_value=release.top5, **common))
    return results


def card_metadata(release: Release, repo_id: str) -> ModelCardData:
    """The YAML header: licence, ``library_name: timm``, tags, dataset, metrics and the paper's results."""
    results = _eval_results(release)
    return ModelCardData(
        license=release.license,
        library_name='timm',
        pipeline_tag='image-classification',
        tags=['image-classification', 'timm', 'nfnet', 'timm-nfnet-ext'],
        datasets=[release.dataset],
        metrics=['accuracy'],
        model_name=repo_id.split('/')[-1] if results else None,
        eval_results=results or None,
    )


def _results_table(release: Release) -> str:
    def pct(v: Optional[float]) -> str:
        return '-' if v is None else f'{v:.1f}'
    return ('| model | params | train px | test px | top-1 | top-5 |\n'
            '|---|---:|---:|---:|---:|---:|\n'
            f'| {release.title} | {release.params_m}M | {release.train_size} | {release.test_size} '
            f'| {pct(release.top1)} | {pct(release.top5)} |')


def _usage(release: Release, repo_id: str) -> str:
    s = release.test_size
    text = f"""```python
import timm
import timm_nfnet_ext  # required: registers these NFNets (pip install timm-nfnet-ext)
from PIL import Image

model = timm.create_model('hf-hub:{repo_id}', pretrained=True).eval()
cfg = timm.data.resolve_data_config({{}}, model=model, use_test_size=True)  # {s} px, bicubic, squash, crop {s}/{s + 32}
transform = timm.data.create_transform(**cfg)
probs = model(transform(Image.open('image.jpg').convert('RGB')).unsqueeze(0)).softmax(-1)
top5 = probs.topk(5)
```

`import timm_nfnet_ext` must come first: `config.json` names the architecture `{release.model}`,
and timm on its own has a different, weightless model under that name, which these weights do
not fit."""
    namespace, name = repo_id.split('/')
    if name == f'{release.model}.dm_in1k':  # the repo the pretrained cfgs point at (hub_repo_id)
        text += f"""

With `TIMM_NFNET_HUB_NAMESPACE={namespace}` set before the import,
`timm.create_model('{release.model}', pretrained=True)` loads these weights too."""
    return text


def _description(release: Release) -> str:
    if release.from_deepmind:
        return f"""{release.title}, a Normalizer-Free Network trained by DeepMind on ImageNet-1k (360 epochs,
batch 4096, with adaptive gradient clipping), from "{PAPER_TITLE}" (Brock, De, Smith,
Simonyan, 2021). These are DeepMind's released weights, unchanged, in safetensors for
[timm](https://github.com/huggingface/pytorch-image-models) through
`timm-nfnet-ext`, whose `{release.model}` computes exactly what DeepMind's JAX code computes
(tanh GELU, DeepMind's weight standardisation, 'SAME' padding)."""
    return f"""{release.title}, a Normalizer-Free Network (`{release.model}` of `timm-nfnet-ext`, the architecture
of "{PAPER_TITLE}", Brock, De, Smith, Simonyan, 2021), in safetensors for
[timm](https://github.com/huggingface/pytorch-image-models). `timm-nfnet-ext` computes exactly
what DeepMind's JAX code computes (tanh GELU, DeepMind's weight standardisation, 'SAME' padding)."""


def _results(release: Release) -> str:
    if release.from_deepmind:
        return f"""## Results (as published)

{_results_table(release)}

ImageNet-1k validation accuracy as reported by the authors ({PAPER_URL},
[code and weights]({CODE_URL})); not re-measured here."""
    return f"""## Results

{_results_table(release)}

As given in the release manifest; not re-measured by the converter."""


def render_card(
        release: Release,
        repo_id: str,
        source_name: str,
        source_sha256: str,
        converter: str,
        proofs: Sequence[str] = (),
) -> str:
    """The full README.md for ``release`` published as ``repo_id``; ``proofs`` lists the checks that passed.

    Args:
        release: the manifest entry.
        repo_id: the Hub repo it is published to.
        source_name: how the source checkpoint is named (its URL, ``hf-hub:`` id or file name).
        source_sha256: the source's sha256.
        converter: the converter's name and version.
        proofs: the checks that passed, one line each.

    Returns:
        The model card, YAML metadata header included.
    """
    s = release.test_size
    header = card_metadata(release, repo_id).to_yaml()
    proof_lines = '\n'.join(f'  - {p}' for p in proofs) or '  - (no checks recorded)'
    body = f"""# {release.title} (`{repo_id}`)

{_description(release)}

{_results(release)}

## Preprocessing

Train at {release.train_size} px, evaluate at {s} px: bicubic resize of the whole image
(aspect not kept, "squash") to {s + 32} x {s + 32}, centre crop {s} x {s}, then ImageNet
mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). In timm terms `test_crop_pct={s}/{s + 32}`,
`crop_mode='squash'`, `interpolation='bicubic'`; `config.json` carries these.

## Usage

{_usage(release, repo_id)}

## Files and conversion

- `model.safetensors`: the weights in `timm-nfnet-ext`'s layout (float32); its metadata names the
  source and the converter.
- `config.json`: timm's model config (architecture `{release.model}` and preprocessing).
- Source: {source_name}, sha256 `{source_sha256}`.
  Original: {release.source_url or 'not public'}.
- Converted by `{converter}` (`timm-nfnet-hub`), which checked before writing:
{proof_lines}

## Licence

{release.license}{', as DeepMind released the weights' if release.from_deepmind else ''}.

## Citation

```bibtex
{CITATION}
```
"""
    return f'---\n{header}\n---\n\n{body}'
