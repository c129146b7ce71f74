"""Every key a user gives is read or refused: `+` keys, closest-key hints, training-only keys."""

import pytest

from conftest import compose_config
from segtrain.composition import precheck
from segtrain.errors import ConfigError
from segtrain.keys import check_added_key, check_effective, closest_key, known_keys


def refused(capsys, command: str, *args: str) -> str:
    with pytest.raises(ConfigError) as refusal:
        precheck(command, list(args))
    message = str(refusal.value)
    assert "\n" not in message, message  # one line (segtrain.cli prints it after "segtrain <command>: error: ")
    return message


@pytest.mark.parametrize("override,message", [
    ("+trainer.max_iter=5", "unknown config key 'trainer.max_iter'; did you mean 'trainer.max_iters'? "
                            "(nothing reads a key added with +)"),
    ("+load_from=x", "unknown config key 'load_from'"),
    ("+trainer.ema=0.9", "unknown config key 'trainer.ema'"),
    ("+loss.class_weight=[1,2]", "unknown config key 'loss.class_weight'; did you mean 'loss.class_weights'? "
                                 "(loss builds CrossEntropy, which takes no argument 'class_weight')"),
    ("+notes.owner=me", "unknown config key 'notes.owner' (nothing reads a key added with +)"),
    ("+dataset.augment.flip=true", "unknown config key 'dataset.augment.flip'"),
    ("+model.foo=1", "model builds DeepLabV3Plus, which takes no argument 'foo'"),
    ("+dataset.source.foo=1", "dataset.source builds shapes_samples, which takes no argument 'foo'"),
])
def test_an_added_key_nothing_reads_is_refused_in_one_line(capsys, override, message):
    assert message in refused(capsys, "train", override)


@pytest.mark.parametrize("override,path,value", [
    ("+optimizer.dampening=0.1", "optimizer.dampening", 0.1),  # an argument of torch.optim.SGD its YAML omits
    ("+backbone.model_kwargs.drop_rate=0.1", "backbone.model_kwargs.drop_rate", 0.1),  # passed on to timm
    ("++trainer.max_iters=7", "trainer.max_iters", 7),  # ++ on an existing key is a plain override
])
def test_an_added_key_that_is_read_is_accepted(override, path, value):
    from omegaconf import OmegaConf

    checked = precheck("train", [override])
    assert OmegaConf.select(checked.cfg, path) == value


def test_a_misspelt_key_gets_the_closest_existing_key(capsys):
    assert refused(capsys, "train", "trainer.max_iter=5").endswith(
        "unknown config key 'trainer.max_iter'; did you mean 'trainer.max_iters'?")
    assert "to add a new key" not in refused(capsys, "train", "dataset.augment.cropsize=[3,3]")
    # A `_target_` node's arguments count as known keys even where its YAML file does not list them.
    assert "did you mean 'optimizer.dampening'?" in refused(capsys, "train", "+optimizer.dampenig=0.1")


def test_closest_key_prefers_the_same_section_and_longer_names():
    known = {"trainer.max_iters", "trainer.amp", "trainer.ema_decay", "eval.max_iters_x"}
    assert closest_key("trainer.max_iter", known) == "trainer.max_iters"
    assert closest_key("trainer.ema", known) == "trainer.ema_decay"
    assert closest_key("zzz.qqq", known) is None


def test_known_keys_are_derived_from_the_composed_config():
    cfg = compose_config("train", ["model=pspnet"])
    keys = known_keys(cfg)
    assert {"trainer.max_iters", "model.bins", "dataset.augment.crop_size", "optimizer.dampening"} <= keys
    check_added_key("optimizer.dampening", cfg)
    with pytest.raises(ConfigError, match="PSPNet, which takes no argument 'bin'"):
        check_added_key("model.bin", cfg)


@pytest.mark.parametrize("key", ["loss.foo", "optimizer.lr", "schedule", "trainer.max_iters"])
def test_training_only_keys_are_refused_by_checkpoint_commands(capsys, key):
    with pytest.raises(ConfigError, match="has no effect here"):
        check_effective(key)
    assert "has no effect here" in refused(capsys, "eval", "ckpt=x.pt", f"{key}=1")


@pytest.mark.parametrize("command", ["export", "info"])
def test_evaluation_keys_are_refused_by_commands_that_evaluate_nothing(capsys, command):
    check_effective("protocol", "eval")
    check_effective("eval.flip", "predict")
    assert "protocol has no effect on " + command in refused(capsys, command, "ckpt=x.pt", "protocol=ms_flip")
    assert "eval.flip has no effect on " + command in refused(capsys, command, "ckpt=x.pt", "eval.flip=true")
