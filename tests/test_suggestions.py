"""'Did you mean' for an unknown command and an unknown config group option, in one line."""

import pytest
from hydra.errors import MissingConfigException

from conftest import run_main
from segtrain.composition import closest_option, missing_option_message


@pytest.mark.parametrize("args,message", [
    (["model=deeplab"], "model=deeplab: no option 'deeplab' in group 'model'; did you mean model=deeplabv3? "
                        "Options: deeplabv3, deeplabv3plus, dla_up, drnseg, hrnet_ocr, hrnetv2, pspnet"),
    (["experiment=quickstrat"], "did you mean experiment=quickstart?"),
    (["backbone=xceptoin"], "did you mean backbone=xception?"),
    (["schedule=linear"], "schedule=linear: no option 'linear' in group 'schedule'; options: cosine, poly, "
                          "poly_warmup"),
])
def test_unknown_group_option_names_the_closest(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main(capsys, "train", *args)
    assert status == 2 and not out and err.count("\n") == 1, err
    assert err.startswith("segtrain train: error: ") and message in err and "Could not find" not in err, err
    assert not list(tmp_path.iterdir())


def test_eval_protocol_option_too(capsys):
    status, _, err = run_main(capsys, "eval", "ckpt=best.pt", "protocol=slide_flp")
    assert status == 2 and "did you mean protocol=slide_flip?" in err


def test_an_option_named_in_a_group_file_says_which_file():
    exc = MissingConfigException("In 'experiment/mine': Could not find 'model/deeplab'\n\nAvailable options in "
                                 "'model':\n\tdeeplabv3\n\tpspnet", "model/deeplab", ["pspnet", "deeplabv3"])
    assert missing_option_message(exc) == ("model=deeplab: no option 'deeplab' in group 'model' (in experiment/mine); "
                                           "did you mean model=deeplabv3? Options: deeplabv3, pspnet")
    assert missing_option_message(MissingConfigException("Cannot find primary config 'x'", "x", None)) is None


def test_closest_option_prefers_the_shortest_extension_then_the_spelling():
    assert closest_option("deeplab", ["deeplabv3plus", "deeplabv3", "pspnet"]) == "deeplabv3"
    assert closest_option("resnet", ["resnet50", "resnet18", "resnet101"]) == "resnet18"
    assert closest_option("psnet", ["deeplabv3", "pspnet"]) == "pspnet"
    assert closest_option("segformer", ["deeplabv3", "pspnet"]) is None


@pytest.mark.parametrize("command,message", [
    ("trian", "segtrain: error: unknown command 'trian'; did you mean 'train'? Commands: train, eval, info, predict, "
              "export, bench, data"),
    ("evaluate", "did you mean 'eval'?"),
    ("fit", "segtrain: error: unknown command 'fit'; choose one of: train, eval"),
])
def test_unknown_command_names_the_closest(capsys, command, message):
    status, _, err = run_main(capsys, command)
    assert status == 2 and message in err and err.count("\n") == 1, err
