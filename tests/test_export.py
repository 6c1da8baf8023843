"""`dist-train export`: ONNX and TorchScript files that reproduce PyTorch's logits, with what
inference needs beside them; `predict` takes the ONNX file as it takes the checkpoint."""

from __future__ import annotations

import csv
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from dist_train.checkpoint import save_model_checkpoint
from dist_train.commands.export import export_model
from dist_train.commands.predict import load_for_inference
from dist_train.config import load_config, to_dict
from dist_train.errors import CheckpointError
from dist_train.recipe.models import create_model

from .conftest import DIGITS_CONFIG, run_cli


def checkpoint(path, model_name: str, channels: int = 1, image_size: int = 16):
    cfg = load_config(DIGITS_CONFIG, [f"model.name={model_name}", f"data.channels={channels}",
                                      f"data.image_size={image_size}", f"data.mean={[0.5] * channels}",
                                      f"data.std={[0.25] * channels}"])
    torch.manual_seed(0)
    model = create_model(model_name, 10, channels)
    meta = {"config": to_dict(cfg), "class_names": [str(i) for i in range(10)], "mixed_precision": "no"}
    return save_model_checkpoint(path, model.state_dict(), meta)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
@pytest.mark.parametrize(("model_name", "channels", "size"), [("resnet18", 3, 32), ("timm/resnet10t", 1, 16)])
def test_the_exported_model_reproduces_pytorchs_logits(tmp_path, fmt, model_name, channels, size):
    best = checkpoint(tmp_path / "best", model_name, channels, size)
    out = tmp_path / f"model.{'onnx' if fmt == 'onnx' else 'pt'}"
    done = export_model(best, fmt, out)
    assert done.max_abs_diff <= 1e-4 and out.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["best", out.name, out.name + ".json"])  # one file
    reference = load_for_inference(best).model.eval()
    images = torch.randn(5, channels, size, size)  # a batch size the export never saw
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    else:
        with pytest.warns(FutureWarning):  # PyTorch deprecates TorchScript; the file still loads
            logits = torch.jit.load(str(out))(images)
    with torch.no_grad():
        assert (logits - reference(images)).abs().max() <= 1e-4
    sidecar = json.loads(done.sidecar.read_text())
    assert sidecar["class_names"] == [str(i) for i in range(10)]
    assert sidecar["input"] == {"name": "images", "dtype": "float32", "layout": "NCHW", "batch": "dynamic",
                                "channels": channels, "height": size, "width": size}
    assert sidecar["mean"] == [0.5] * channels and sidecar["std"] == [0.25] * channels
    assert sidecar["eval_crop"] == {"resize": [size, size]}  # digits_cpu's light augmentation


def test_a_failed_export_leaves_nothing_and_names_the_difference(tmp_path):
    best = checkpoint(tmp_path / "best", "small_cnn")
    (tmp_path / "m.onnx").write_bytes(b"the previous export")
    expected = r"outputs differ from PyTorch's by .* \(more than 1e-30\); nothing written"
    with pytest.raises(CheckpointError, match=expected):
        export_model(best, "onnx", tmp_path / "m.onnx", tolerance=1e-30)
    assert (tmp_path / "m.onnx").read_bytes() == b"the previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "m.onnx"]


def test_a_sidecar_goes_only_with_its_own_model(tmp_path, monkeypatch):
    """The model is renamed first and the sidecar last; a failed sidecar rename takes the new
    model with it; a sidecar of another export, or one whose classes or image size the ONNX
    graph contradicts, is refused by predict in one line, never used to name predictions."""
    first, second = checkpoint(tmp_path / "a", "small_cnn"), checkpoint(tmp_path / "b", "small_cnn", image_size=24)
    out = tmp_path / "m.onnx"
    export_model(first, "onnx", out)
    sidecar = out.with_name("m.onnx.json")
    kept = sidecar.read_text()
    real_replace = os.replace

    def failing_for_the_sidecar(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_for_the_sidecar)
    with pytest.raises(CheckpointError, match=r"cannot write it \(No space left on device\); nothing written"):
        export_model(second, "onnx", out)
    monkeypatch.undo()
    assert not out.exists() and sidecar.read_text() == kept  # no new model beside the old sidecar
    with pytest.raises(CheckpointError, match=r"needs the file and its m\.onnx\.json"):
        load_for_inference(out)
    export_model(second, "onnx", out)
    sidecar.write_text(kept)  # the first export's sidecar beside the second's model
    with pytest.raises(CheckpointError, match=r"m.onnx.json was written for another model than .*m.onnx"):
        load_for_inference(out)
    export_model(first, "onnx", out)
    info = json.loads(sidecar.read_text())
    for change, problem in [({"class_names": [str(i) for i in range(12)]}, "classes 10 differ from its sidecar's 12"),
                            ({"class_names": "0123456789"}, "class_names must be a list of names")]:
        sidecar.write_text(json.dumps({k: v for k, v in info.items() if k != "model_sha256"} | change))
        with pytest.raises(CheckpointError, match=problem):
            load_for_inference(out)


def test_export_onto_a_directory_or_of_an_onnx_file_is_one_line(tmp_path):
    best = checkpoint(tmp_path / "best", "small_cnn")
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match=r"export --out .*out: a directory; name the model file"):
        export_model(best, "onnx", tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []
    export_model(best, "onnx", tmp_path / "m.onnx")
    with pytest.raises(CheckpointError, match=r"m\.onnx: an ONNX file is an export already"):
        export_model(tmp_path / "m.onnx", "onnx", tmp_path / "again.onnx")


@pytest.mark.slow
def test_predict_with_the_onnx_file_gives_the_checkpoints_top_1(digits_dir, tmp_path):
    run = tmp_path / "run"
    trained = run_cli("train", "--config", str(DIGITS_CONFIG), f"data.train={digits_dir}", f"data.val={digits_dir}",
                      f"train.output_dir={run}", "train.epochs=1", "train.progress_bar=false", "tracking.wandb=false",
                      "tracking.plots=false")
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = run_cli("export", "--checkpoint", str(run / "best"), "--format", "onnx",
                       "--out", str(tmp_path / "d.onnx"))
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "largest difference from PyTorch's logits" in exported.stdout
    val_shards = [str(p) for p in sorted(digits_dir.glob("val-*.tar"))]
    rows = {}
    models = {"checkpoint": run / "best", "onnx": tmp_path / "d.onnx"}
    with ThreadPoolExecutor(max_workers=2) as pool:  # the two predictions side by side
        done = dict(zip(models, pool.map(lambda name: run_cli(
            "predict", "--checkpoint", str(models[name]), "--input", *val_shards,
            "--out", str(tmp_path / f"{name}.csv")), models), strict=True))
    for name in models:
        assert done[name].returncode == 0, done[name].stderr[-3000:]
        with open(tmp_path / f"{name}.csv") as f:
            rows[name] = [(r["source"], r["predicted"]) for r in csv.DictReader(f)]
    assert len(rows["onnx"]) == 359 and rows["onnx"] == rows["checkpoint"]


def test_export_and_predict_without_the_export_extra_name_the_pip_command(tmp_path, monkeypatch):
    import importlib.util

    from dist_train.errors import ConfigError

    best = checkpoint(tmp_path / "best", "small_cnn")
    export_model(best, "onnx", tmp_path / "m.onnx")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("onnx") else real(name, *a))
    with pytest.raises(ConfigError, match=r"^export --format onnx needs onnx, onnxscript, onnxruntime: "
                                          r"pip install 'dist-train\[export\]'$"):
        export_model(best, "onnx", tmp_path / "again.onnx")
    with pytest.raises(ConfigError, match=r"m\.onnx: an ONNX model needs onnxruntime: pip install"):
        load_for_inference(tmp_path / "m.onnx")
