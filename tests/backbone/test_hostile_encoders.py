"""Hostile encoder files (issue 19 item 3): every bad weights file or folder is one line
naming it and the problem, and what mrlcache writes reloads as the same encoder.

Tiny random ECAPA-TDNN and CAM++ written as SpeechBrain folders and 3D-Speaker state dicts.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import make_tree

from mrlcache.backbone import CheckpointError, load_backbone, save_checkpoint
from mrlcache.backbone.registry import encoder_module
from mrlcache.cli import main

ECAPA = {"channels": [16, 16, 16, 16, 48], "attention_channels": 8, "se_channels": 8, "res2net_scale": 4,
         "lin_neurons": 8}
CAMPPLUS = {"growth_rate": 8, "bn_size": 2, "init_channels": 16, "embedding_size": 8}


def built(name, config):
    torch.manual_seed(0)
    return encoder_module(name).build(config).eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    save_checkpoint(built("ecapa-tdnn", ECAPA), root / "ecapa.pt")
    save_checkpoint(built("campplus", CAMPPLUS), root / "campplus.pt")
    return root


def speechbrain_folder(root, name, hyperparams=None, state=None):
    """A SpeechBrain-style folder: the tiny ECAPA's state dict as embedding_model.ckpt (+ yaml)."""
    folder = root / name
    folder.mkdir()
    state = state if state is not None else torch.load(root / "ecapa.pt", weights_only=True)["state_dict"]
    torch.save(state, folder / "embedding_model.ckpt")
    if hyperparams is not None:
        (folder / "hyperparams.yaml").write_text(hyperparams)
    return folder


def model_args(**changes):
    args = {"input_size": 80, "channels": ECAPA["channels"], "kernel_sizes": [5, 3, 3, 3, 1],
            "dilations": [1, 2, 3, 4, 1], "attention_channels": 8, "res2net_scale": 4, "se_channels": 8,
            "lin_neurons": 8}
    return yaml.safe_dump({"embedding_model": {**args, **changes}})


def refused(source, *message, backbone=None):
    with pytest.raises(CheckpointError) as err:
        load_backbone(str(source), backbone=backbone)
    text = str(err.value)
    assert "\n" not in text and str(source) in text
    for part in message:
        assert part in text, text
    return text


@pytest.mark.parametrize("weights, backbone, found", [
    ("ecapa.pt", "campplus", "ecapa-tdnn"), ("campplus.pt", "ecapa-tdnn", "campplus"),
    ("ecapa.pt", "redimnet", "ecapa-tdnn"),
])
def test_weights_of_another_encoder_are_refused(files, weights, backbone, found):
    refused(files / weights, f"holds a {found} checkpoint, not {backbone}", f"--backbone {found}", backbone=backbone)


@pytest.mark.parametrize("dilations", [[1, 2, 3, 0, 1], [1, 2, 3, -1, 1], [1, 2, 3, 4.5, 1], [True, 2, 3, 4, 1]])
def test_hyperparams_with_impossible_dilations_are_refused(files, tmp_path, dilations):
    folder = speechbrain_folder(files, f"dil-{tmp_path.name}", model_args(dilations=dilations))
    refused(folder, "dilations must be whole numbers >= 1")


def test_hyperparams_that_lie_about_the_shapes_are_refused(files):
    folder = speechbrain_folder(files, "lies", model_args(channels=[1024, 1024, 1024, 1024, 3072]))
    refused(folder, "hyperparams.yaml disagrees with the weights' shapes", "channels [1024")


def test_hyperparams_that_are_a_folder_are_refused(files):
    folder = speechbrain_folder(files, "yaml-dir")
    (folder / "hyperparams.yaml").mkdir()
    refused(folder, "hyperparams.yaml: not a regular file")


def test_hyperparams_never_construct_python_objects(files, tmp_path):
    marker = tmp_path / "ran"
    folder = speechbrain_folder(files, "pyobj", f"embedding_model: !!python/object/apply:os.system ['touch {marker}']\n")
    refused(folder, "cannot read")
    assert not marker.exists()


def test_a_folder_without_weights_is_refused(tmp_path):
    refused(tmp_path, "a folder with no weights file mrlcache knows")


def test_nan_weights_are_refused(files):
    state = {k: v.clone() for k, v in torch.load(files / "ecapa.pt", weights_only=True)["state_dict"].items()}
    state["blocks.0.conv.conv.weight"][0, 0, 0] = float("nan")
    refused(speechbrain_folder(files, "nan", state=state), "NaN or infinite", "blocks.0.conv.conv.weight")


def test_a_model_config_that_disagrees_with_the_weights_is_refused(files, tmp_path):
    ckpt = torch.load(files / "ecapa.pt", weights_only=True)
    ckpt["model_config"] = {**ckpt["model_config"], "channels": [32, 32, 32, 32, 96]}
    torch.save(ckpt, tmp_path / "lies.pt")
    refused(tmp_path / "lies.pt", "model_config disagrees with the weights' shapes", "channels [32, 32, 32, 32, 96]")


@pytest.mark.parametrize("name, config", [
    ("ecapa-tdnn", {**ECAPA, "dilations": [1, 3, 5, 7, 1]}),  # dilations are not in the shapes
    ("campplus", {**CAMPPLUS, "embedding_relu": False}),  # nor is CAM++'s embedding ReLU
])
def test_what_mrlcache_writes_reloads_as_the_same_encoder(name, config, tmp_path):
    model = built(name, config)
    save_checkpoint(model, tmp_path / "w.pt")
    again = load_backbone(str(tmp_path / "w.pt"))
    assert again.model_config == model.model_config
    wave = torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(again(wave), model(wave))


def test_extract_refuses_a_lying_folder_in_one_line_and_writes_nothing(files, tmp_path):
    data = tmp_path / "data"
    make_tree(data, speakers=1, videos=1, utts=1, seconds=0.5)
    folder = speechbrain_folder(files, "cli-dil", model_args(dilations=[1, 2, 3, 0, 1]))
    result = CliRunner().invoke(main, ["extract", "--data", str(data), "--out", str(tmp_path / "c"), "--weights",
                                       str(folder), "--mode", "eval", "--workers", "0", "--quiet"])
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "dilations must be whole numbers >= 1" in lines[0], result.output
    assert not (tmp_path / "c").exists()
