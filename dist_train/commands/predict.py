"""Inference with a saved checkpoint: rebuild the model from its meta.json, classify images.

Inputs may be image files, folders (searched recursively for images) or tar shards; the
result is one CSV row per image with its source (file path, or `shard#key`), the predicted
class, its probability and the top-k classes. A multi-label model's row holds instead the
labels whose probability reaches `train.threshold`, each with its probability.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dist_train.atomic_file import replacing
from dist_train.checkpoint import load_model_checkpoint, sha256_file
from dist_train.config import Config, config_from_dict
from dist_train.data import workers
from dist_train.data.datasets import cache_if_remote
from dist_train.data.labels import label_reader
from dist_train.data.pipeline import Collate, EvalStreamSpec, decode_image, make_eval_loader
from dist_train.data.remote import is_remote
from dist_train.data.resolve import resolve_shards
from dist_train.data.shard_format import IMAGE_EXTENSIONS, ShardSet
from dist_train.data.transforms import build_transform, eval_geometry
from dist_train.errors import CheckpointError, ConfigError, DataError
from dist_train.recipe.models import create_model, logits_of
from dist_train.runtime.progress_lines import Progress


@dataclass
class LoadedModel:
    model: nn.Module
    cfg: Config
    class_names: list[str]
    meta: dict


def load_for_inference(checkpoint: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """A model checkpoint directory (RUN/best), or an ONNX file written by `dist-train export`."""
    if str(checkpoint).endswith(".onnx"):
        return _load_onnx(Path(checkpoint))
    state, meta = load_model_checkpoint(checkpoint)
    try:
        cfg = config_from_dict(meta["config"])
        class_names = meta["class_names"]
    except KeyError as exc:
        raise CheckpointError(f"{checkpoint}: meta.json lacks {exc}") from None
    except ConfigError as exc:
        raise CheckpointError(f"{checkpoint}: meta.json holds no valid config ({exc})") from None
    if not isinstance(class_names, list) or not class_names or not all(isinstance(c, str) for c in class_names):
        raise CheckpointError(f"{checkpoint}: meta.json class_names must be a list of names")
    if meta.get("mixed_precision", "no") not in ("no", "bf16", "fp16"):
        raise CheckpointError(f"{checkpoint}: meta.json mixed_precision {str(meta['mixed_precision'])[:40]!r} "
                              "is not one of no, bf16, fp16")
    try:
        model = create_model(cfg.model.name, len(class_names), cfg.data.channels, cfg.model.kwargs)
    except ConfigError as exc:
        raise CheckpointError(f"{checkpoint}: meta.json's model does not build ({exc})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{checkpoint}: weights do not fit model {cfg.model.name} ({exc})") from None
    return LoadedModel(model.to(device).eval(), cfg, class_names, meta)


def require_export_extra(what: str, modules: tuple[str, ...]) -> None:
    """The `export` extra's `modules`, or one line naming the pip command that installs them."""
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{what} needs {', '.join(missing)}: pip install 'dist-train[export]'")


class OnnxClassifier:
    """An exported ONNX model run by onnxruntime, called like the PyTorch model (CPU)."""

    def __init__(self, path: Path):
        require_export_extra(f"{path}: an ONNX model", ("onnxruntime",))
        import onnxruntime

        self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"images": images.cpu().numpy()})[0])

    def eval(self) -> OnnxClassifier:
        return self


def _load_onnx(path: Path) -> LoadedModel:
    """The ONNX file and its sidecar (`<file>.json`: class names and the run's config)."""
    sidecar = path.with_name(path.name + ".json")
    if not path.is_file() or not sidecar.is_file():
        raise CheckpointError(f"{path}: an ONNX model needs the file and its {sidecar.name} from dist-train export")
    try:
        info = json.loads(sidecar.read_text())
        cfg = config_from_dict(info["config"])
        class_names = info["class_names"]
    except (OSError, ValueError, KeyError, TypeError, ConfigError, RecursionError) as exc:
        raise CheckpointError(f"{sidecar}: not a dist-train export sidecar ({str(exc)[:200]})") from None
    if not isinstance(class_names, list) or not class_names or not all(isinstance(c, str) for c in class_names):
        raise CheckpointError(f"{sidecar}: class_names must be a list of names")
    if "model_sha256" in info and info["model_sha256"] != sha256_file(path):
        raise CheckpointError(f"{sidecar} was written for another model than {path} (its SHA-256 differs); "
                              "export again")
    try:
        model = OnnxClassifier(path)
    except ConfigError:
        raise
    except Exception as exc:  # onnxruntime's own errors share no base class
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({' '.join(str(exc).split())[:200]})") from None
    _check_onnx_fits(model, cfg, class_names, path)
    return LoadedModel(model, cfg, class_names, info)


def _check_onnx_fits(model: OnnxClassifier, cfg: Config, class_names: list[str], path: Path) -> None:
    """The sidecar's images and classes are the ONNX model's: its input's channels and size and
    its output's classes, where the graph fixes them."""
    (given,), (output,) = model.session.get_inputs(), model.session.get_outputs()
    side = eval_geometry(cfg.data).crop
    expected = {"input channels": (given.shape[1:2], cfg.data.channels), "input height": (given.shape[2:3], side),
                "input width": (given.shape[3:4], side), "classes": (output.shape[-1:], len(class_names))}
    for what, (dims, wanted) in expected.items():
        if len(dims) != 1 or (isinstance(dims[0], int) and dims[0] != wanted):
            raise CheckpointError(f"{path}: the model's {what} {dims[0] if dims else 'missing'} differ from its "
                                  f"sidecar's {wanted}")


class ImageFiles(Dataset):
    def __init__(self, paths: list[Path], cfg: Config, num_classes: int):
        self.paths = paths
        # An image file has no known label: -1 (multi-label: a row of -1).
        self.unknown = torch.full((num_classes,), -1.0) if cfg.data.task == "multilabel" else -1
        self.transform = build_transform(cfg.data, train=False)
        self.mode = "L" if cfg.data.channels == 1 else "RGB"
        self.max_pixels = cfg.data.max_image_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, str]:
        path = self.paths[i]
        image = decode_image(path, self.mode, self.max_pixels, str(path))
        return self.transform(image), self.unknown, str(path)


def collect_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Split inputs into image files and tar shards; folders are searched for images."""
    images: list[Path] = []
    shards: list[str] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            images.extend(sorted(p for p in path.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS))
        elif item.endswith(".tar") or "{" in item or is_remote(item):
            shards.append(item)
        elif path.is_file():
            images.append(path)
        else:
            raise DataError(f"input not found: {item}")
    if not images and not shards:
        raise DataError(f"no images or shards found in {inputs}")
    return images, shards


def predict_batches(loaded: LoadedModel, inputs: list[str], batch_size: int, device) -> Iterator[tuple]:
    """(probabilities, labels, sources) per batch; labels are -1 where unknown. Probabilities are
    a softmax over classes, or for a multi-label model each label's sigmoid."""
    images, shards = collect_inputs(inputs)
    loaders = []
    if images:
        loaders.append(DataLoader(ImageFiles(images, loaded.cfg, len(loaded.class_names)), batch_size=batch_size,
                                  collate_fn=Collate(loaded.cfg.data),
                                  **workers.loader_options(loaded.cfg.data.num_workers)))
    if shards:
        cache = cache_if_remote(shards, loaded.cfg.data)
        labels = label_reader(loaded.cfg.data, len(loaded.class_names))
        shard_set = ShardSet(resolve_shards(shards, "val", len(loaded.class_names), cache=cache, labels=labels).shards,
                             None)
        spec = EvalStreamSpec(shard_set, batch_size=batch_size,
                              num_classes=len(loaded.class_names), with_keys=True)
        loaders.append(make_eval_loader(spec, loaded.cfg.data))
    progress = Progress("predict", len(images) + (shard_set.samples if shards else 0))
    with torch.no_grad():
        for loader in loaders:
            for batch, labels, sources in loader:
                logits = logits_of(loaded.model, batch.to(device), loaded.cfg.data.tta).float()
                probs = logits.sigmoid() if loaded.cfg.data.task == "multilabel" else logits.softmax(dim=1)
                progress.advance(len(sources))
                yield probs.cpu(), labels, sources
    progress.close()


def write_predictions(loaded: LoadedModel, inputs: list[str], out: str | Path, top_k: int = 3,
                      batch_size: int = 256, device: str = "cpu") -> int:
    """Write the CSV; returns the number of rows."""
    top_k = min(top_k, len(loaded.class_names))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Renamed into place when complete: a bad image halfway must not leave a previous CSV of
    # that name cut down to its header.
    with replacing(out) as tmp:
        if loaded.cfg.data.task == "multilabel":
            return _write_multilabel_rows(loaded, inputs, tmp, batch_size, device)
        return _write_rows(loaded, inputs, tmp, top_k, batch_size, device)


def _write_multilabel_rows(loaded: LoadedModel, inputs: list[str], out: Path, batch_size: int, device) -> int:
    """source, the labels (if known), the predicted labels (probability >= train.threshold) and
    their probabilities, highest first; names separated by ";"."""
    names, threshold = loaded.class_names, loaded.cfg.train.threshold
    rows = 0
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "labels", "predicted", "probabilities"])
        for probs, labels, sources in predict_batches(loaded, inputs, batch_size, device):
            for p, label, source in zip(probs.tolist(), labels.tolist(), sources, strict=True):
                above = sorted((i for i, q in enumerate(p) if q >= threshold), key=lambda i: -p[i])
                known = label[0] >= 0
                writer.writerow([
                    source,
                    ";".join(names[i] for i, v in enumerate(label) if v > 0) if known else "",
                    ";".join(names[i] for i in above),
                    ";".join(f"{names[i]}:{p[i]:.4f}" for i in above),
                ])
                rows += 1
    return rows


def _write_rows(loaded: LoadedModel, inputs: list[str], out: Path, top_k: int, batch_size: int, device) -> int:
    rows = 0
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "label", "predicted", "probability", "top_k"])
        for probs, labels, sources in predict_batches(loaded, inputs, batch_size, device):
            values, indices = probs.topk(top_k, dim=1)
            for p, idx, label, source in zip(values.tolist(), indices.tolist(), labels.tolist(), sources, strict=True):
                names = [loaded.class_names[i] for i in idx]
                writer.writerow([
                    source,
                    loaded.class_names[label] if label >= 0 else "",
                    names[0],
                    f"{p[0]:.6f}",
                    " ".join(f"{n}:{q:.4f}" for n, q in zip(names, p, strict=True)),
                ])
                rows += 1
    return rows
