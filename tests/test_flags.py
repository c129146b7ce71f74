"""Flags of other trainers (`--resume`, `--lr`, `--epochs`, `--config`, ...) answered with segtrain's
key=value form, in one line, before anything runs; Hydra's own options still work."""

import pytest

from conftest import run_main
from segtrain.flags import parse_command_line, segtrain_form


@pytest.mark.parametrize("args,answer", [
    (["--resume"], "--resume is not an option; use resume=auto (this run directory's newest checkpoint, with "
                   "hydra.run.dir=<run directory>) or resume=<checkpoint.pt>"),
    (["--resume", "runs/a/last.pt"], "--resume is not an option; use resume=runs/a/last.pt"),
    (["trainer.max_iters=5", "--lr", "0.01"], "--lr is not an option; use optimizer.lr=0.01"),
    (["--learning_rate=0.01"], "--learning_rate is not an option; use optimizer.lr=0.01"),
    (["--batch-size", "8"], "--batch-size is not an option; use trainer.batch_size=8"),
    (["--epochs", "50"], "--epochs is not an option; use trainer.max_iters=N (training is counted in optimizer steps"),
    (["--config", "my.yaml"], "--config is not an option; use experiment=NAME for a recipe of conf/experiment/"),
    (["--weights", "w.pth"], "--weights is not an option; use init_from=w.pth (a whole model's weights) or "
                             "backbone.weights=w.pth"),
    (["--lr", "trainer.max_iters=5"], "--lr is not an option; use optimizer.lr=..."),
])
def test_train_flags_get_the_override_that_does_it(capsys, tmp_path, monkeypatch, args, answer):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main(capsys, "train", *args)
    assert status == 2 and err.startswith(f"segtrain train: error: {answer}"), err
    assert err.count("\n") == 1 and "usage:" not in err and not list(tmp_path.iterdir())


def test_checkpoint_commands_get_their_own_form(capsys):
    status, _, err = run_main(capsys, "eval", "--checkpoint", "runs/a/checkpoints/best.pt")
    assert status == 2 and "--checkpoint is not an option; use ckpt=runs/a/checkpoints/best.pt" in err
    # A training flag means nothing to eval: it is an unknown option there.
    status, _, err = run_main(capsys, "eval", "--lr", "1")
    assert status == 2 and "--lr is not an option of segtrain eval; settings are key=value overrides" in err


def test_any_other_option_is_one_line_naming_it(capsys):
    status, _, err = run_main(capsys, "train", "--frobnicate")
    assert status == 2 and err.strip() == ("segtrain train: error: --frobnicate is not an option of segtrain train; "
                                           "settings are key=value overrides (segtrain train --help lists the groups "
                                           "and keys)")
    status, _, err = run_main(capsys, "train", "--conf", "x")  # argparse: an abbreviation of three options
    assert status == 2 and "ambiguous option: --conf" in err and err.count("\n") == 1
    status, _, err = run_main(capsys, "train", "a=1", "-m", "b=2")
    assert status == 2 and "b=2 follows an option" in err


def test_hydras_options_are_parsed_as_before():
    parsed = parse_command_line("train", ["-m", "--cfg", "job", "--package", "trainer", "trainer.max_iters=3"])
    assert parsed.multirun and parsed.cfg == "job" and parsed.package == "trainer"
    assert parsed.overrides == ["trainer.max_iters=3"]
    assert segtrain_form("train", "--cfg", "job") is None and segtrain_form("train", "--resolve", None) is None

