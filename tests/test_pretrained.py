"""model.weights: saved weights from a local file or run, with a new head for another class
count, the first conv adapted to other input channels, and nothing unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from dist_train.checkpoint import save_model_checkpoint
from dist_train.errors import CheckpointError
from dist_train.recipe.models import create_model
from dist_train.recipe.pretrained import adapt_input_conv, load_pretrained


@pytest.fixture(scope="module")
def resnet18_1000():
    """A torchvision ResNet-18 as an ImageNet checkpoint has it: 1000 classes, RGB."""
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=1000).state_dict()


def save(state, path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name", ["resnet18.safetensors", "resnet18.pth"])
def test_every_backbone_tensor_loads_and_another_class_count_gets_a_new_head(resnet18_1000, tmp_path, name):
    model = create_model("resnet18", num_classes=10)
    fresh_head = model.fc.weight.clone()
    report = load_pretrained(model, save(resnet18_1000, tmp_path / name))
    state = model.state_dict()
    for key, value in resnet18_1000.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key
    assert report.new == ["fc.weight", "fc.bias"] and torch.equal(model.fc.weight, fresh_head)
    assert report.loaded == len(resnet18_1000) - 2 and report.ignored == []
    assert "tensors loaded; new (the head for this class count): fc.weight, fc.bias" in report.line()


def test_the_same_class_count_loads_the_head_too_and_a_ddp_prefix_is_dropped(resnet18_1000, tmp_path):
    model = create_model("resnet18", num_classes=1000)
    path = save({f"module.{k}": v for k, v in resnet18_1000.items()}, tmp_path / "ddp.pth")
    assert load_pretrained(model, path).new == []
    assert torch.equal(model.fc.weight, resnet18_1000["fc.weight"])


def test_grayscale_keeps_the_pretrained_filters_summed_over_rgb(resnet18_1000, tmp_path):
    model = create_model("resnet18", num_classes=10, in_channels=1)
    report = load_pretrained(model, save(resnet18_1000, tmp_path / "r.safetensors"))
    assert report.adapted == ["conv1.weight"]
    assert torch.equal(model.conv1.weight, resnet18_1000["conv1.weight"].sum(dim=1, keepdim=True))
    gray = torch.rand(1, 1, 8, 8)
    rgb_conv = torch.nn.functional.conv2d(gray.expand(1, 3, 8, 8), resnet18_1000["conv1.weight"])
    assert torch.allclose(torch.nn.functional.conv2d(gray, model.conv1.weight), rgb_conv, atol=1e-5)
    assert adapt_input_conv(torch.ones(2, 1, 3, 3), 3).sum() == torch.ones(2, 1, 3, 3).sum()


def test_a_backbone_of_another_shape_is_one_line_naming_the_key(resnet18_1000, tmp_path):
    bad = dict(resnet18_1000, **{"layer2.0.conv1.weight": torch.zeros(128, 32, 3, 3)})
    with pytest.raises(CheckpointError, match=r"^model.weights: .*bad.pth: layer2.0.conv1.weight has shape "
                                              r"\(128, 32, 3, 3\), the model needs \(128, 64, 3, 3\)"):
        load_pretrained(create_model("resnet18", 10), save(bad, tmp_path / "bad.pth"))
    with pytest.raises(CheckpointError, match=r"lacks conv1.weight and \d+ more \(weights of another architecture"):
        load_pretrained(create_model("resnet18", 10), save(create_model("small_cnn", 10).state_dict(),
                                                           tmp_path / "small.safetensors"))


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # unpickling this would create the marker file


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"evil.pth holds more than tensors and is refused unread"):
        load_pretrained(create_model("resnet18", 10), path)
    assert not marker.exists()


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
    """A .pth whose records declare far more than the file holds (torch.save stores them
    uncompressed): 64 MiB of zeros deflated to about 64 kB."""
    import zipfile

    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", b"\0" * (64 << 20))
    with pytest.raises(CheckpointError, match=r"bomb.pth: its records declare 67,108,864 bytes inside a file of"):
        load_pretrained(create_model("resnet18", 10), path)
    # What torch.save writes declares about its own size, and loads.
    assert load_pretrained(create_model("small_cnn", 10, 1), save(create_model("small_cnn", 10, 1).state_dict(),
                                                                   tmp_path / "ok.pth")).loaded > 0


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool])
def test_weights_of_integer_or_bool_values_are_refused_for_float_parameters(tmp_path, dtype):
    state = {k: (v != 0).to(dtype) if k == "head.weight" else v
             for k, v in create_model("small_cnn", 10, 1).state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"head.weight holds {str(dtype).removeprefix('torch.')} values, "
                                              r"the model's are float32"):
        load_pretrained(create_model("small_cnn", 10, 1), save(state, tmp_path / "q.safetensors"))


def test_a_dist_train_checkpoint_loads_with_its_hash_checked(tmp_path):
    torch.manual_seed(1)
    source = create_model("small_cnn", 10, 1)
    save_model_checkpoint(tmp_path / "best", source.state_dict(), {"epoch": 0})
    model = create_model("small_cnn", 5, 1)
    report = load_pretrained(model, tmp_path / "best")
    assert report.new == ["head.weight", "head.bias"]
    assert torch.equal(model.features[0].weight, source.features[0].weight)
    (tmp_path / "best" / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(CheckpointError, match="missing, truncated or altered"):
        load_pretrained(create_model("small_cnn", 5, 1), tmp_path / "best")


def test_a_timm_models_weights_load_with_only_the_head_new(tmp_path):
    torch.manual_seed(0)
    source = create_model("timm/convnext_atto", num_classes=1000)
    path = save(source.state_dict(), tmp_path / "convnext_atto.safetensors")
    model = create_model("timm/convnext_atto", num_classes=10)
    report = load_pretrained(model, path)
    assert report.new == ["head.fc.weight", "head.fc.bias"]
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in source.state_dict().items() if not k.startswith("head.fc."))


def fill_hub_cache(cache: Path, repo: str, state: dict, pretrained_cfg: dict) -> None:
    """The Hugging Face cache's layout as `hf download` leaves it: refs/main names a snapshot."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    (snapshot / "config.json").write_text(json.dumps({"architecture": "resnet10t", "pretrained_cfg": pretrained_cfg}))


def test_hub_weights_load_from_the_local_cache_and_name_their_pretrained_cfg(tmp_path, monkeypatch):
    """hf-hub:<repo> as timm names it, read from a cache the test fills (no network); the
    repository's mean and std, where the run's differ, are named in the log line."""
    from huggingface_hub import constants

    from dist_train.config import DataConfig

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(2)
    state = create_model("timm/resnet18", 10).state_dict()
    fill_hub_cache(tmp_path / "hub", "timm/resnet18.a1_in1k", state,
                   {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.95, "interpolation": "bicubic"})
    model = create_model("timm/resnet18", 10)
    report = load_pretrained(model, "hf-hub:timm/resnet18.a1_in1k", DataConfig())
    assert report.loaded == len(state) and not report.new
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert "trained with data.mean=[0.5, 0.5, 0.5], data.std=[0.5, 0.5, 0.5], data.crop_pct=0.95, " \
           "data.interpolation=bicubic" in report.line()
    with pytest.raises(CheckpointError, match=r"hf-hub:timm/vit_not_here: not in the local Hugging Face cache .*"
                                              r"dist-train never downloads"):
        load_pretrained(create_model("timm/resnet10t", 10), "hf-hub:timm/vit_not_here")


def test_a_hub_entry_not_in_the_cache_ends_train_with_one_line_and_exit_2(digits_dir, tmp_path):
    """`model.weights=hf-hub:timm/resnet18.a1_in1k` with an empty cache: one line naming the
    repository and the cache, exit 2, before the run directory is made (and nothing is downloaded)."""
    from .conftest import DIGITS_CONFIG, run_cli

    cache = tmp_path / "hub"
    cache.mkdir()
    result = run_cli("train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
                     "model.name=timm/resnet18", "model.weights=hf-hub:timm/resnet18.a1_in1k",
                     f"train.output_dir={tmp_path / 'run'}", "tracking.wandb=false",
                     env={"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    # The last line: an older timm's import warns about torch.jit.interface before it (timm 1.0.12).
    assert result.stderr.strip().splitlines()[-1] == (
        f"dist-train: error: model.weights=hf-hub:timm/resnet18.a1_in1k: not in the local Hugging Face cache "
        f"({cache}); dist-train never downloads: fetch it once where there is a network "
        "(`hf download timm/resnet18.a1_in1k`) into that cache")
    assert not (tmp_path / "run").exists() and list(cache.iterdir()) == []  # nothing written, nothing fetched


def test_a_missing_weights_file_ends_train_before_the_run_directory_is_made(digits_dir, tmp_path):
    from .conftest import DIGITS_CONFIG, run_cli

    missing = tmp_path / "nowhere.safetensors"
    result = run_cli("train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
                     f"model.weights={missing}", f"train.output_dir={tmp_path / 'run'}", "tracking.wandb=false")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"dist-train: error: model.weights: {missing} not found (a .safetensors or .pth file, or a run's best/)")
    assert not (tmp_path / "run").exists()
