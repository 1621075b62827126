"""Presets, variants, big_vision-style arguments, command-line overrides and their errors."""

import pytest

from clidim_jax import cli
from clidim_jax.config_lib import VARIANTS, ConfigError, validate


def parse(*args):
    return cli.parse_flags("train", ["--workdir=/tmp/unused", *args]).config


def test_reference_preset_is_code_faithful():
    c = parse("--config=configs/reference.py")
    assert (c.model.depth, c.model.ngf, c.train.batch_size) == (8, 64, 128)
    assert (c.train.n_epochs, c.train.n_epochs_decay) == (500, 300)
    assert (c.loss.l1, c.loss.ssim, c.loss.tv, c.loss.contrastive) == (100.0, 10.0, 1e-4, 1.0)
    assert c.loss.contrastive_loss == "infonce" and not c.loss.head_trainable
    assert c.data.normalization == "reference"
    validate(c)


def test_paper_preset_states_the_papers_values():
    c = parse("--config=configs/paper.py")
    assert (c.model.depth, c.train.batch_size, c.loss.l1) == (7, 32, 1.0)
    assert (c.train.n_epochs, c.train.n_epochs_decay) == (500, 500)
    assert c.loss.contrastive_loss == "ntxent"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants(variant):
    c = parse(f"--config=configs/reference.py:variant={variant}")
    assert c.variant == variant
    for k, v in VARIANTS[variant].items():
        assert c.loss[k] == v


def test_overrides_and_defaults():
    c = parse("--config=configs/reference.py:variant=cl,seed=3", "--config.train.batch_size=8")
    assert (c.train.batch_size, c.seed, c.loss.ssim) == (8, 3, 0.0)
    demo = parse()  # no --config: the bundled demo
    assert demo.name == "demo" and demo.data.source == "demo"
    validate(demo)


def test_typo_in_field_name_is_an_error_naming_it():
    with pytest.raises(cli.UsageError, match="batch_sise"):
        parse("--config.train.batch_sise=8")


def test_unknown_variant_and_argument():
    with pytest.raises(cli.UsageError, match="unknown variant"):
        parse("--config=configs/reference.py:variant=nope")
    with pytest.raises(cli.UsageError, match="unknown config argument"):
        parse("--config=configs/reference.py:colour=red")


def test_bad_values_are_named():
    c = parse("--config.model.norm=group")
    with pytest.raises(ConfigError, match=r"model\.norm"):
        validate(c)
    c = parse("--config.data.patch_size=100")
    with pytest.raises(ConfigError, match="patch_size=100"):
        validate(c)


def test_missing_config_file():
    with pytest.raises(cli.UsageError, match="not found"):
        parse("--config=nowhere/nothing.py")
