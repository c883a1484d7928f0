"""TrainConfig: the typed settings of timm-nfnet-train, and the single source of its flags."""
import dataclasses

import pytest

from timm_nfnet_ext.train.config import TrainConfig, TrainError
from timm_nfnet_ext.train.recipe import RECIPES, build_parser, resolve_settings


def test_every_field_is_a_flag_and_every_flag_a_field():
    parser = build_parser()
    dests = {a.dest for a in parser._actions} - {'help', 'quickstart', 'data'}  # parser-only conveniences
    assert dests == {f.name for f in dataclasses.fields(TrainConfig)}


def test_recipe_choices_are_the_recipes():
    recipe = next(a for a in build_parser()._actions if a.dest == 'recipe')
    assert sorted(recipe.choices) == sorted(RECIPES)


def test_resolved_settings_are_typed_and_defaults_come_from_the_fields():
    cfg, sources, _ = resolve_settings(['--data-dir', '/x', '--epochs', '3', '--scale', '0.5', '1.0', '--amp'])
    assert isinstance(cfg, TrainConfig)
    assert cfg.epochs == 3 and cfg.scale == [0.5, 1.0] and cfg.amp is True
    assert cfg.batch_size == TrainConfig().batch_size and sources['batch_size'] == 'default'
    assert sources['epochs'] == 'cli'


def test_paper_recipe_values_are_marked_as_the_recipes():
    cfg, sources, _ = resolve_settings(['--data-dir', '/x', '--recipe', 'paper', '--model', 'nfnet_f1'])
    assert cfg.model_ema_decay == 0.99999 and sources['model_ema_decay'] == 'recipe paper'
    assert cfg.img_size == 224  # F1's train size, from the variant table


def test_from_settings_names_unknown_and_missing_settings():
    settings = TrainConfig().to_dict()
    settings.pop('epochs')
    settings['epoch'] = 3
    with pytest.raises(TrainError, match=r"unknown \['epoch'\], missing \['epochs'\]"):
        TrainConfig.from_settings(settings)


def test_list_defaults_are_not_shared_between_configs():
    a, b = TrainConfig(), TrainConfig()
    a.scale.append(9.0)
    assert b.scale == [0.08, 1.0]


def test_flags_of_timms_pipeline_given_with_the_reference_one_are_named_in_a_note():
    _, _, notes = resolve_settings(['--data-dir', '/x', '--recipe', 'paper', '--mixup-off-epoch', '300', '--hflip', '0'])
    assert any('--hflip, --mixup-off-epoch' in n and 'not used by --data-pipeline reference' in n for n in notes)
    _, _, notes = resolve_settings(['--data-dir', '/x', '--recipe', 'paper', '--data-pipeline', 'timm', '--hflip', '0'])
    assert not any('not used by' in n for n in notes)


def test_a_checkpoint_of_the_other_input_pipeline_is_refused():
    from timm_nfnet_ext.train.checkpoint import check_compatible
    identity = dict(model='nfnet_f0', model_args={}, num_classes=10, opt='sgdagc', agc=0.01, model_ema=True,
                    data_pipeline='reference', global_batch=8, world_size=1)
    check_compatible({'identity': identity, 'step': 3}, identity, 'last.pth.tar')
    with pytest.raises(TrainError, match="data_pipeline: checkpoint 'timm', now 'reference'"):
        check_compatible({'identity': dict(identity, data_pipeline='timm'), 'step': 0}, identity, 'last.pth.tar')
