"""What ``timm-nfnet-train`` shows and writes: settings, summary.csv, the curves plot."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

from ..files import atomic_path, write_text_atomic

__all__ = ['to_plain', 'format_settings', 'settings_yaml', 'write_summary', 'write_plot', 'SUMMARY_COLUMNS']

SUMMARY_COLUMNS = ('epoch', 'train_loss', 'eval_loss', 'eval_top1', 'eval_top5', 'lr', 'clip_fraction')


def to_plain(v: Any) -> Any:
    """``v`` as YAML/JSON/checkpoint-safe values: lists, str-keyed dicts, scalars; anything else as str.

    Args:
        v: the value (tuples become lists, recursively).

    Returns:
        The plain value.
    """
    if isinstance(v, (list, tuple)):
        return [to_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): to_plain(x) for k, x in v.items()}
    return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)


def format_settings(settings: Mapping[str, Any], sources: Mapping[str, str], derived: Mapping[str, Any]) -> str:
    """The settings block printed at start: every value not at its default, then derived ones.

    Args:
        settings: the resolved settings (``TrainConfig.to_dict()``).
        sources: where each setting came from (``'cli'``, ``'recipe <name>'``, ``'default'``).
        derived: the settings derived at set-up (``RunRecord.derived``).

    Returns:
        The text, one setting a line.
    """
    chosen = {k: v for k, v in sorted(settings.items()) if sources.get(k, 'default') != 'default'}
    width = max([len(k) for k in list(chosen) + list(derived)] + [8])
    lines = ['settings (value  [where it comes from]):']
    lines += [f'  {k:<{width}}  {to_plain(v)!r}  [{sources[k]}]' for k, v in chosen.items()]
    lines += [f'  {k:<{width}}  {to_plain(v)!r}  [derived]' for k, v in derived.items()]
    n_default = sum(1 for k in settings if sources.get(k, 'default') == 'default')
    lines.append(f'  ... and {n_default} more at their defaults (all of them in args.yaml)')
    return '\n'.join(lines)


def settings_yaml(settings: Mapping[str, Any], sources: Mapping[str, str], derived: Mapping[str, Any]) -> str:
    """All resolved settings (and their sources) as YAML.

    Args:
        settings: the resolved settings.
        sources: where each setting came from (only those not ``'default'`` are written).
        derived: the settings derived at set-up.

    Returns:
        A YAML document with ``settings``, ``derived`` and ``sources``.
    """
    import yaml
    doc = {'settings': {k: to_plain(v) for k, v in sorted(settings.items())},
           'derived': {k: to_plain(v) for k, v in derived.items()},
           'sources': {k: v for k, v in sorted(sources.items()) if v != 'default'}}
    return yaml.safe_dump(doc, sort_keys=False)


def write_summary(history: Sequence[Mapping[str, Any]], path: os.PathLike) -> Path:
    """timm-style summary.csv, one row per finished epoch, written atomically.

    Not timm's ``update_summary``: it appends a row per call, so a run resumed from a checkpoint
    older than the last row would repeat rows; this rewrites the file from the checkpointed
    history, whole or not at all.

    Args:
        history: one dict per finished epoch; columns beyond :data:`SUMMARY_COLUMNS` are appended.
        path: the file to write.

    Returns:
        The file written.
    """
    columns: List[str] = list(SUMMARY_COLUMNS)
    for row in history:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, restval='', lineterminator='\n')
    writer.writeheader()
    for row in history:
        writer.writerow({k: ('' if v is None else v) for k, v in row.items()})
    return write_text_atomic(buf.getvalue(), path)


def write_plot(history: Sequence[Mapping[str, Any]], path: os.PathLike) -> bool:
    """Loss and accuracy curves as a PNG (atomically); False when matplotlib is missing.

    Args:
        history: one dict per finished epoch.
        path: the PNG file to write.

    Returns:
        ``True`` when the plot was written.
    """
    try:
        import matplotlib
        matplotlib.use('Agg', force=False)
        from matplotlib.figure import Figure
    except ImportError:
        return False
    path = Path(path)
    epochs = [r['epoch'] for r in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    _curves(ax_loss, epochs, history, {'train_loss': 'train', 'eval_loss': 'validation'}, 'loss')
    _curves(ax_acc, epochs, history, {'eval_top1': 'top-1', 'eval_top5': 'top-5'}, 'validation accuracy (%)')
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format='png')
    return True


def _curves(ax: Any, epochs: List[int], history: Sequence[Mapping[str, Any]], keys: Dict[str, str], ylabel: str) -> None:
    for key, label in keys.items():
        points = [(e, r[key]) for e, r in zip(epochs, history) if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker='o', label=label)
    ax.set_xlabel('epoch')
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.legend()
