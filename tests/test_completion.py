"""Shell completion: the commands, a command's groups, options and keys, cut where the shell's word starts."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import checkout_env, run_main
from segtrain.completion import candidates

BASH_BREAKS = "\"'><=;|&(:"


def test_commands_then_groups_and_keys_of_that_command():
    assert candidates("segtrain tr") == ["train"]
    assert candidates("segtrain ") == ["--help", "--version", "bench", "data", "eval", "export", "info", "predict",
                                       "train"]
    assert candidates("segtrain train mod") == ["model=", "model."]
    assert candidates("segtrain train trainer.max") == ["trainer.max_iters=", "trainer.max_skipped_steps="]
    # eval reads no model group (the checkpoint decides), so it is not offered
    assert "model=" not in candidates("segtrain eval m") and "protocol=" in candidates("segtrain eval p")
    assert candidates("segtrain data ") == ["check", "prepare"]
    assert "dataset=" in candidates("segtrain data check d")


def test_an_option_or_value_is_cut_where_the_shells_word_starts():
    """bash splits `model=deep` at `=`: the word to complete is `deep`, so the candidates start there."""
    assert candidates("segtrain train model=deep", BASH_BREAKS) == ["deeplabv3", "deeplabv3plus"]
    assert candidates("segtrain train model=deep", "") == ["model=deeplabv3", "model=deeplabv3plus"]
    assert candidates("segtrain train trainer.deterministic=", BASH_BREAKS) == ["false", "true"]
    # a key of the chosen option's config: composed with the groups already on the line
    assert "backbone.output_stride=" in candidates("segtrain train backbone=resnet50 backbone.out")


def test_install_prints_a_script_for_segtrain_itself_and_other_shells_get_one_line(capsys):
    status, out, _ = run_main(capsys, "train", "-sc", "install=bash")
    assert status == 0 and out.rstrip().endswith("-F _segtrain_complete segtrain")
    status, out, _ = run_main(capsys, "-sc", "install=zsh")
    assert status == 0 and out.startswith("autoload -U +X bashcompinit && bashcompinit")
    status, out, err = run_main(capsys, "train", "-sc", "install=fish")
    assert status == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "bash and zsh" in err and 'eval "$(segtrain -sc install=bash)"' in err


@pytest.mark.cli
@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completes_through_the_installed_function(tmp_path: Path):
    """The script evaluated in a real bash, its function called as bash calls it on TAB."""
    shim = tmp_path / "bin" / "segtrain"
    shim.parent.mkdir()
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m segtrain \"$@\"\n")
    shim.chmod(0o755)
    env = checkout_env({"PATH": f"{shim.parent}:{checkout_env()['PATH']}"})
    script = ('eval "$(segtrain -sc install=bash)"\n'
              'COMP_LINE="segtrain train model=deep"; COMP_POINT=${#COMP_LINE}\n'
              "_segtrain_complete\n"
              'printf "%s\\n" "${COMPREPLY[@]}"\n')
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["deeplabv3", "deeplabv3plus"]
