"""The Python API: `from dist_train import fit, load_config`, as in a notebook: `fit` returns
the trained model with the best metrics, two runs in one process may differ in precision, and
importing the package costs no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
from safetensors.torch import load_file

from .conftest import DIGITS_CONFIG, REPO


def test_two_fits_in_one_process_with_another_precision_return_their_trained_models(digits_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    from dist_train import fit, load_config
    from dist_train.runtime import progress_lines

    monkeypatch.setattr(progress_lines, "EVERY_S", 0.0)  # a progress line per batch
    common = [f"data.train={digits_dir}", f"data.val={digits_dir}", "train.epochs=1", "data.image_size=8",
              "data.num_workers=0", "tracking.wandb=false", "tracking.plots=false", "data.val_batch_size=128"]
    first = fit(load_config(DIGITS_CONFIG, [*common, f"train.output_dir={tmp_path / 'fp32'}"]))
    # No terminal here (as in a Slurm log): the validation's progress as lines on stderr.
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("validation")]
    assert [line.split(",")[0] for line in lines] == [f"validation: {n} of 359 images ({100 * n // 359}%)"
                                                     for n in (128, 256, 359)]
    second = fit(load_config(DIGITS_CONFIG, [*common, f"train.output_dir={tmp_path / 'bf16'}",
                                             "train.mixed_precision=bf16"]))
    for result in (first, second):
        saved = load_file(str(result.output_dir / "last" / "model.safetensors"))
        assert all(torch.equal(value.cpu(), saved[key]) for key, value in result.model.state_dict().items())
        assert result.best_epoch == 0 and 0 < result.best_metrics["val/acc"] <= 1
    meta = json.loads((tmp_path / "bf16" / "best" / "meta.json").read_text())
    assert meta["mixed_precision"] == "bf16" and meta["config"]["train"]["mixed_precision"] == "bf16"


def test_importing_the_package_imports_no_torch():
    code = "import sys, dist_train; print('torch' in sys.modules, dist_train.load_config.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.split() == ["False", "dist_train.config"]
