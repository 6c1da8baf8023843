"""`dist-train export`: a checkpoint's model as ONNX or TorchScript, checked before it is kept.

    dist-train export --checkpoint runs/digits/best --format onnx --out digits.onnx

Beside the model, `<out>.json` holds what inference needs: class names, image size, channels,
mean and std, the evaluation crop, and the run's config (so `dist-train predict --checkpoint
digits.onnx` prepares images exactly as training validated them). The input is a float32 NCHW
batch, normalized; the batch dimension is dynamic. On export the file is loaded back (ONNX:
by onnxruntime) and run on two sample batches of different sizes: the largest difference from
PyTorch's logits is printed, and over `tolerance` nothing is written. Both files are written
under temporary names and renamed, the model first; the sidecar holds the model's SHA-256,
which `predict` checks. TorchScript (torch.jit.trace) is deprecated by PyTorch and
offered for runtimes that still need it; prefer ONNX.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from dist_train.checkpoint import sha256_file
from dist_train.commands.predict import LoadedModel, load_for_inference, require_export_extra
from dist_train.data.transforms import eval_geometry
from dist_train.errors import CheckpointError

TOLERANCE = 1e-4  # max abs logit difference from PyTorch accepted on export
SAMPLE_BATCHES = (2, 3)  # two sizes: the dynamic batch dimension is exercised too


@dataclass
class Exported:
    path: Path
    sidecar: Path
    max_abs_diff: float


def export_model(checkpoint: str | Path, fmt: Literal["onnx", "torchscript"], out: str | Path,
                 tolerance: float = TOLERANCE) -> Exported:
    if str(checkpoint).endswith(".onnx"):
        raise CheckpointError(f"export --checkpoint {checkpoint}: an ONNX file is an export already; give the "
                              "checkpoint directory it came from (RUN/best)")
    if fmt == "onnx":
        require_export_extra("export --format onnx", ("onnx", "onnxscript", "onnxruntime"))
    loaded = load_for_inference(checkpoint)
    model = loaded.model.eval()
    data = loaded.cfg.data
    generator = torch.Generator().manual_seed(0)
    side = eval_geometry(data).crop  # what the exported model is given: evaluation's images
    samples = [torch.randn(n, data.channels, side, side, generator=generator)
               for n in SAMPLE_BATCHES]
    out = Path(out)
    sidecar = out.with_name(out.name + ".json")
    if out.is_dir():
        raise CheckpointError(f"export --out {out}: a directory; name the model file (e.g. {out}/model.{fmt})")
    model_tmp, sidecar_tmp = (p.with_name(f".{p.name}.tmp") for p in (out, sidecar))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            run = (_export_onnx if fmt == "onnx" else _export_torchscript)(model, samples[0], model_tmp)
            diff = max(float((run(x) - model(x)).abs().max()) for x in samples)
        if not diff <= tolerance:
            raise CheckpointError(f"export to {fmt}: outputs differ from PyTorch's by {diff:.3g} "
                                  f"(more than {tolerance:g}); nothing written")
        info = _sidecar(loaded, fmt, checkpoint, diff) | {"model_sha256": sha256_file(model_tmp)}
        sidecar_tmp.write_text(json.dumps(info, indent=2) + "\n")
        # The model first, its sidecar last: a sidecar names the model it goes with (its hash),
        # and if its rename fails the new model goes too; predict refuses a pair that differs.
        os.replace(model_tmp, out)
        try:
            os.replace(sidecar_tmp, sidecar)
        except OSError:
            out.unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise CheckpointError(f"export --out {out}: cannot write it ({exc.strerror or exc}); nothing written") from None
    finally:
        for tmp in (model_tmp, sidecar_tmp):
            tmp.unlink(missing_ok=True)
    return Exported(out, sidecar, diff)


def _export_onnx(model: torch.nn.Module, sample: torch.Tensor, path: Path):
    import onnxruntime

    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(model, (sample,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), dynamo=True, verbose=False,
                      external_data=False)  # one file: weights inside (ONNX allows up to 2 GB)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _export_torchscript(model: torch.nn.Module, sample: torch.Tensor, path: Path):
    with warnings.catch_warnings():  # torch.jit's own deprecation notice (see the module docstring)
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(model, sample).save(str(path))
        traced = torch.jit.load(str(path))
    return traced


def _sidecar(loaded: LoadedModel, fmt: str, checkpoint: str | Path, diff: float) -> dict:
    data = loaded.cfg.data
    geometry = eval_geometry(data)
    return {
        "format": fmt,
        "input": {"name": "images", "dtype": "float32", "layout": "NCHW", "batch": "dynamic",
                  "channels": data.channels, "height": geometry.crop, "width": geometry.crop},
        "output": {"name": "logits", "classes": len(loaded.class_names)},
        "class_names": loaded.class_names,
        "mean": data.mean, "std": data.std,
        # As training validated: RGB or gray, scaled to [0, 1], resized, normalized.
        "eval_crop": ({"resize": [geometry.crop, geometry.crop]} if geometry.squash else
                      {"resize_short_side": geometry.resize, "center_crop": geometry.crop}),
        "interpolation": data.interpolation,
        # flip: the model was validated on the mean logits of each image and its mirror
        "tta": data.tta,
        "source_checkpoint": str(checkpoint),
        "max_abs_diff_vs_pytorch": diff,
        "config": loaded.meta.get("config"),
    }
