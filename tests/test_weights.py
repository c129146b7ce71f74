"""Pretrained weights without network: cache lookup, checksums, and the offline message."""

import hashlib
import time

import pytest
import torch

from conftest import node
from segtrain.errors import WeightsError, first_line
from segtrain.models import build_backbone
from segtrain.models.backbones import drn as drn_module
from segtrain.models.backbones import weights
from segtrain.weights_file import load_weights_file

URL = "https://weights.example.invalid/models/"


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache at $TORCH_HOME/hub, and no network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a torch.hub.set_dir() elsewhere would win over TORCH_HOME
    monkeypatch.setenv("SEGTRAIN_OFFLINE", "1")
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    return checkpoints


def _save_hashed(directory, stem: str, state: dict) -> str:
    """Save `state` as `<stem>-<sha256 prefix>.pth`, the torchvision / DRN naming; return the file name."""
    scratch = directory / f"{stem}.tmp"
    torch.save(state, scratch)
    name = f"{stem}-{hashlib.sha256(scratch.read_bytes()).hexdigest()[:8]}.pth"
    scratch.rename(directory / name)
    return name


def test_cached_file_with_the_hash_of_its_name_loads_without_its_classifier(torch_home):
    name = _save_hashed(torch_home, "tiny", {"conv.weight": torch.ones(2), "fc.weight": torch.zeros(3)})
    state = weights.load_url_weights(URL + name, "tiny")
    assert set(state) == {"conv.weight"} and torch.equal(state["conv.weight"], torch.ones(2))


def test_cached_file_whose_content_does_not_match_its_hash_is_refused_naming_it(torch_home):
    torch.save({"conv.weight": torch.ones(2)}, torch_home / "tiny-0badc0de.pth")  # a copy cut short, say
    with pytest.raises(WeightsError, match="Delete it and download it again") as info:
        weights.load_url_weights(URL + "tiny-0badc0de.pth", "tiny")
    assert str(torch_home / "tiny-0badc0de.pth") in str(info.value) and "its name says 0badc0de" in str(info.value)


def test_unreadable_cached_file_without_a_hash_is_named(torch_home):
    (torch_home / "tiny.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match=r"cannot read .* from .*tiny\.pth .*Delete it and download it again"):
        weights.load_url_weights(URL + "tiny.pth", "tiny")


def test_download_not_matching_its_hash_keeps_nothing(torch_home, monkeypatch):
    def corrupt_download(url, dst, hash_prefix=None, progress=True):
        raise RuntimeError(f'invalid hash value (expected "{hash_prefix}", got "0000")')

    monkeypatch.setattr(weights, "host_reachable", lambda url: True)
    monkeypatch.setattr(torch.hub, "download_url_to_file", corrupt_download)
    with pytest.raises(WeightsError, match=r"does not match the SHA-256 prefix .*Download it again"):
        weights.load_url_weights(URL + "tiny-12345678.pth", "tiny")
    assert not (torch_home / "tiny-12345678.pth").exists()


def test_drn_pretrained_loads_the_official_file_from_the_cache(torch_home, monkeypatch):
    torch.manual_seed(0)
    source = drn_module.DRN("drn_d_22")
    release = {**source.state_dict(), "fc.weight": torch.randn(1000, 512, 1, 1), "fc.bias": torch.randn(1000)}
    name = _save_hashed(torch_home, "drn_d_22", release)
    monkeypatch.setitem(drn_module.WEIGHT_URLS, "drn_d_22", URL + name)
    loaded = drn_module.DRN("drn_d_22", pretrained=True)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


HF_FOLDER = "put the {} folder it writes in the Hugging Face cache here ({})"


@pytest.mark.parametrize("backbone_name,where", [
    ("drn_d_105", "put it at {checkpoints}/drn_d_105-12b40979.pth (torch hub checkpoints directory)"),
    ("resnet101", HF_FOLDER.format("models--timm--resnet101.tv_in1k", "{hf_cache}")),
    ("resnet18", HF_FOLDER.format("models--timm--resnet18.a1_in1k", "{hf_cache}")),
    ("hrnet_w48", HF_FOLDER.format("models--timm--hrnet_w48.ms_in1k", "{hf_cache}")),
    ("xception65", HF_FOLDER.format("models--timm--xception65.tf_in1k", "{hf_cache}")),  # DeepLab's TF weights
])
def test_offline_pretrained_fails_fast_saying_where_the_file_goes(torch_home, monkeypatch, backbone_name, where):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    where = where.format(checkpoints=torch_home, hf_cache=constants.HF_HUB_CACHE)
    start = time.perf_counter()
    with pytest.raises(WeightsError) as info:
        build_backbone(node("backbone", backbone_name, pretrained=True))
    assert time.perf_counter() - start < 30
    message = str(info.value)
    assert message.startswith("backbone.pretrained=true: the ImageNet weights of ") and "\n" not in message
    assert f"{where}; or pass backbone.weights=/path/to/" in message, message


def test_offline_message_names_the_torchvision_file_behind_a_tv_tag(torch_home, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    with pytest.raises(WeightsError, match=r"backbone.weights=/path/to/resnet50-0676ba61\.pth"):
        build_backbone(node("backbone", "resnet50", pretrained=True))


class _Touch:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (type(self.marker).touch, (self.marker,))


def test_the_weight_file_reader_refuses_code_and_names_unreadable_files(tmp_path):
    torch.save({"conv.weight": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch.equal(load_weights_file(tmp_path / "plain.pt")["conv.weight"], torch.ones(2))
    torch.save({"weight": _Touch(tmp_path / "ran")}, tmp_path / "code.pt")
    with pytest.raises(WeightsError, match=r"refusing to load init_from=\S*code\.pt: .*Python global .*could run code"):
        load_weights_file(tmp_path / "code.pt", setting="init_from")
    assert not (tmp_path / "ran").exists()
    (tmp_path / "cut.pt").write_bytes((tmp_path / "plain.pt").read_bytes()[:100])
    with pytest.raises(WeightsError, match=r"cannot read \S*cut\.pt \(.*\): the file is cut short") as error:
        load_weights_file(tmp_path / "cut.pt")
    assert "\n" not in str(error.value)
    with pytest.raises(WeightsError, match=r"backbone.weights=\S*absent\.pt: no such file"):
        load_weights_file(tmp_path / "absent.pt", setting="backbone.weights")


def test_first_line_is_one_plain_line_of_a_message_or_an_error():
    assert first_line("\x1b[31m\n  first  \nsecond") == "first"
    assert first_line(ValueError("bad value\ndetails")) == "ValueError: bad value"
    assert first_line(RuntimeError()) == "RuntimeError: no details"
