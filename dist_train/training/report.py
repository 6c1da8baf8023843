"""Plots, a summary and a per-class table for a run directory, from its own files.

    dist-train report RUN_DIR

reads `metrics.jsonl`, `best/meta.json` and `last/meta.json` and (re)writes, in RUN_DIR:

    loss.png  metrics.png  lr.png  confusion_matrix.png  per_class_f1.png  summary.md

and prints the per-class precision / recall / F1 table of the best checkpoint, computed
from its confusion matrix exactly as scikit-learn's `classification_report` computes it from
the predictions. A multi-label run gets a per-label table (with each label's average precision
and AUROC) and `per_label.png` in place of the last two plots. summary.md also gives the
samples per class of each split. Training calls the same code at its end (`tracking.plots`),
so a run directory explains itself without wandb.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dist_train import atomic_file
from dist_train.config import config_from_dict
from dist_train.data.transforms import eval_geometry
from dist_train.errors import DataError
from dist_train.recipe.optim import lr_factor_fn, scaled_lr
from dist_train.training.tracking import read_metrics

PLOT_NAMES = ("loss.png", "metrics.png", "lr.png", "confusion_matrix.png", "per_class_f1.png")
MULTILABEL_PLOT_NAMES = ("loss.png", "metrics.png", "lr.png", "per_label.png")
MAX_ANNOTATED_CLASSES = 30  # count labels inside confusion-matrix cells up to this many classes
MAX_BARS = 40  # per-class F1: beyond this many classes, show the lowest ones


@dataclass
class RunRecords:
    run_dir: Path
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    best: dict[str, Any]
    last: dict[str, Any] | None

    @property
    def class_names(self) -> list[str]:
        return self.best["class_names"]

    @property
    def multilabel(self) -> bool:
        return self.best.get("task") == "multilabel"

    @property
    def plot_names(self) -> tuple[str, ...]:
        return MULTILABEL_PLOT_NAMES if self.multilabel else PLOT_NAMES

    @property
    def layout(self) -> dict[str, Any]:
        """How the run ran at its end (processes, accumulation, global batch, base LR), as
        meta.json records it."""
        meta = self.last or self.best
        return meta.get("layout") or _layout_before_it_was_recorded(meta)


def _layout_before_it_was_recorded(meta: dict[str, Any]) -> dict[str, Any]:
    """Run directories of dist-train 0.1.0 lack `layout`: the config's request, which is what
    ran unless the run was resumed on another number of processes."""
    cfg = config_from_dict(meta["config"])
    world = meta.get("world_size", 1)
    global_batch = world * cfg.train.grad_accum_steps * cfg.data.batch_size
    return {"world_size": world, "grad_accum_steps": cfg.train.grad_accum_steps, "batch_size": cfg.data.batch_size,
            "global_batch": global_batch, "steps_per_epoch": meta["step"] // (meta["epoch"] + 1),
            "epochs": cfg.train.epochs, "base_lr": scaled_lr(cfg.optim, global_batch)}


@dataclass(frozen=True)
class ClassScores:
    name: str
    precision: float
    recall: float
    f1: float
    support: int


def load_run(run_dir: str | Path) -> RunRecords:
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise DataError(f"{run_dir}: not a run directory (no metrics.jsonl)")
    records = read_metrics(run_dir / "metrics.jsonl")
    best_meta = run_dir / "best" / "meta.json"
    if not best_meta.is_file():
        raise DataError(f"{run_dir}: no best checkpoint yet (best/meta.json)")
    last_meta = run_dir / "last" / "meta.json"
    return RunRecords(
        run_dir=run_dir,
        train=[r for r in records if "train/loss" in r],
        val=[r for r in records if "val/loss" in r],
        best=json.loads(best_meta.read_text()),
        last=json.loads(last_meta.read_text()) if last_meta.is_file() else None,
    )


def per_class_scores(confusion: list[list[int]], class_names: list[str]) -> list[ClassScores]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows: true class).

    A class never predicted has precision 0, one never present has recall 0, as with
    scikit-learn's `zero_division=0`.
    """
    matrix = np.asarray(confusion, dtype=np.float64)
    precision, recall, f1 = _precision_recall_f1(np.diag(matrix), matrix.sum(axis=0), matrix.sum(axis=1))
    return [
        ClassScores(name, float(p), float(r), float(f), int(s))
        for name, p, r, f, s in zip(class_names, precision, recall, f1, matrix.sum(axis=1), strict=True)
    ]


def _precision_recall_f1(true_positive, predicted, support) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and F1 from counts (arrays or scalars); 0 where undefined
    (scikit-learn's `zero_division=0`)."""
    true_positive, predicted, support = (np.asarray(a, dtype=np.float64) for a in (true_positive, predicted, support))
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return precision, recall, f1


def format_table(scores: list[ClassScores]) -> str:
    """The per-class table, with accuracy and macro / weighted averages, like scikit-learn's."""
    width = max(12, *(len(s.name) for s in scores))
    total = sum(s.support for s in scores)
    lines = [f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'support':>9}", ""]
    lines += [f"{s.name:>{width}} {s.precision:9.4f} {s.recall:9.4f} {s.f1:9.4f} {s.support:9d}" for s in scores]
    correct = sum(s.recall * s.support for s in scores)
    lines += ["", f"{'accuracy':>{width}} {'':9} {'':9} {correct / max(total, 1):9.4f} {total:9d}"]
    for label, weights in (("macro avg", [1.0] * len(scores)), ("weighted avg", [s.support for s in scores])):
        norm = sum(weights) or 1.0
        p, r, f = (sum(w * getattr(s, k) for w, s in zip(weights, scores, strict=True)) / norm
                   for k in ("precision", "recall", "f1"))
        lines.append(f"{label:>{width}} {p:9.4f} {r:9.4f} {f:9.4f} {total:9d}")
    return "\n".join(lines)


@dataclass(frozen=True)
class LabelScores(ClassScores):
    average_precision: float
    auroc: float


def per_label_scores(per_label: dict[str, list], label_names: list[str]) -> list[LabelScores]:
    """Per-label precision, recall, F1 (at the run's threshold), support (images with the label),
    average precision and AUROC, from a multi-label checkpoint's `per_label` record."""
    confusion = np.asarray(per_label["confusion"], dtype=np.float64)  # per label [[tn, fp], [fn, tp]]
    true_positive, support = confusion[:, 1, 1], confusion[:, 1].sum(axis=1)
    precision, recall, f1 = _precision_recall_f1(true_positive, confusion[:, :, 1].sum(axis=1), support)
    return [LabelScores(name, float(p), float(r), float(f), int(n), ap, auroc)
            for name, p, r, f, n, ap, auroc in zip(label_names, precision, recall, f1, support, per_label["ap"],
                                                   per_label["auroc"], strict=True)]


def format_label_table(scores: list[LabelScores], per_label: dict[str, list]) -> str:
    """The per-label table, with micro and macro averages, like scikit-learn's for multi-label data."""
    width = max(12, *(len(s.name) for s in scores))
    header = f"{'':>{width}} {'precision':>9} {'recall':>9} {'f1-score':>9} {'AP':>9} {'AUROC':>9} {'support':>9}"
    lines = [header, ""]
    lines += [f"{s.name:>{width}} {s.precision:9.4f} {s.recall:9.4f} {s.f1:9.4f} {s.average_precision:9.4f} "
              f"{s.auroc:9.4f} {s.support:9d}" for s in scores]
    summed = np.asarray(per_label["confusion"]).sum(axis=0)  # micro: the labels' counts added up
    p, r, f = _precision_recall_f1(summed[1, 1], summed[:, 1].sum(), summed[1].sum())
    total = sum(s.support for s in scores)
    lines += ["", f"{'micro avg':>{width}} {p:9.4f} {r:9.4f} {f:9.4f} {'':9} {'':9} {total:9d}"]
    means = [float(np.nanmean([getattr(s, k) for s in scores]))
             for k in ("precision", "recall", "f1", "average_precision", "auroc")]
    lines.append(f"{'macro avg':>{width}} " + " ".join(f"{m:9.4f}" for m in means) + f" {total:9d}")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> str:
    """Write the plots and summary.md; return the per-class table of the best checkpoint."""
    run = load_run(run_dir)
    if run.multilabel:
        scores = per_label_scores(run.best["per_label"], run.class_names)
        table = format_label_table(scores, run.best["per_label"])
    else:
        scores = per_class_scores(run.best["confusion_matrix"], run.class_names)
        table = format_table(scores)
    _write_plots(run, scores)
    atomic_file.write_text(run.run_dir / "summary.md", _summary(run, table))
    return table


def _write_plots(run: RunRecords, scores: list[ClassScores]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, safe in workers and on clusters
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    name = run.best["config"]["train"]["output_dir"]
    best_epoch, best_step = run.best["epoch"], run.best["step"]

    fig, ax = plt.subplots(figsize=(7, 4.2))
    if run.train:
        ax.plot([r["step"] for r in run.train], [r["train/loss"] for r in run.train],
                label=f"train ({run.best['config']['loss']['name']})", color="tab:blue", alpha=0.8)
    val_loss = "binary cross-entropy" if run.multilabel else "cross-entropy"
    ax.plot([r["step"] for r in run.val], [r["val/loss"] for r in run.val], "o-", label=f"validation ({val_loss})",
            color="tab:orange")
    ax.set(title=f"Loss — {name}", xlabel="optimizer step", ylabel="loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    _save(fig, run.run_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(7, 4.2))
    # By step, as the loss: validations may also come mid-epoch (train.val_every_steps).
    steps = [r["step"] for r in run.val]
    shown_metrics = (
        (("val/map_macro", "mAP (macro)"), ("val/f1_micro", "F1 (micro)"), ("val/f1_macro", "F1 (macro)"),
         ("val/subset_acc", "subset accuracy"), ("val/auroc_macro", "AUROC (macro)")) if run.multilabel else
        (("val/acc", "accuracy"), ("val/acc_top5", "top-5 accuracy"), ("val/f1_macro", "F1 (macro)"),
         ("val/precision_macro", "precision (macro)"), ("val/recall_macro", "recall (macro)"),
         ("val/auroc_macro", "AUROC (macro)")))
    for key, label in shown_metrics:
        if key not in run.val[0]:  # top-5: only with more than 5 classes
            continue
        ax.plot(steps, [r[key] for r in run.val], "o-", label=label, markersize=3)
    ax.axvline(best_step, color="grey", linestyle="--", linewidth=1,
               label=f"best: epoch {best_epoch}, step {best_step}")
    ax.set(title=f"Validation metrics — {name}", xlabel="optimizer step", ylabel="score")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    _save(fig, run.run_dir / "metrics.png")

    fig, ax = plt.subplots(figsize=(7, 3.2))
    curve = lr_curve(run)
    if curve is not None:
        ax.plot(*curve, color="tab:green", label="schedule")
    if run.train:
        ax.plot([r["step"] for r in run.train], [r["lr"] for r in run.train], ".", color="black",
                markersize=4, label="logged")
    sched = run.best["config"]["sched"]
    ax.set(title=f"Learning rate ({sched['name']}, warmup {sched['warmup_epochs']} epochs)",
           xlabel="optimizer step", ylabel="learning rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, run.run_dir / "lr.png")

    if run.multilabel:
        _plot_per_label(plt, run, scores, run.run_dir / "per_label.png")
        return
    _plot_confusion(plt, run, run.run_dir / "confusion_matrix.png")

    shown = scores if len(scores) <= MAX_BARS else sorted(scores, key=lambda s: s.f1)[:MAX_BARS]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.28 * len(shown) + 1.2)))
    y = np.arange(len(shown))
    ax.barh(y, [s.f1 for s in shown], color="tab:blue")
    for i, s in enumerate(shown):  # the value inside the bar's end, or after a short bar
        inside = s.f1 > 0.15
        ax.text(s.f1 - 0.01 if inside else s.f1 + 0.01, i, f"{s.f1:.3f}", va="center", fontsize=8,
                ha="right" if inside else "left", color="white" if inside else "black")
    macro = float(np.mean([s.f1 for s in scores]))
    ax.axvline(macro, color="tab:red", linestyle="--", linewidth=1)
    ax.set_yticks(y, [s.name for s in shown])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    subset = "" if len(shown) == len(scores) else f", lowest {len(shown)} of {len(scores)} classes"
    ax.set(title=f"Per-class F1, best epoch {best_epoch} (macro F1 {macro:.3f}, dashed{subset})",
           xlabel="F1 score", ylabel="class")
    _save(fig, run.run_dir / "per_class_f1.png")


def lr_curve(run: RunRecords) -> tuple[list[int], list[float]] | None:
    """The exact per-step LR of a closed-form schedule, from the config and how the run ran."""
    cfg = config_from_dict(run.best["config"])
    if cfg.sched.name == "plateau":
        return None  # depends on the metrics: only the logged points are known
    layout = run.layout
    factor = lr_factor_fn(cfg.sched, layout["steps_per_epoch"], layout["epochs"], layout["base_lr"])
    steps = list(range(layout["steps_per_epoch"] * layout["epochs"] + 1))
    return steps, [layout["base_lr"] * factor(t) for t in steps]


def _plot_confusion(plt, run: RunRecords, path: Path) -> None:
    matrix = np.asarray(run.best["confusion_matrix"], dtype=np.float64)
    names = run.class_names
    n = len(names)
    # Colour by the share of each true class, so rare classes are as visible as common ones.
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = min(12, max(4.5, 0.45 * n + 2))
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= MAX_ANNOTATED_CLASSES:
        ax.set_xticks(range(n), names, rotation=45 if max(map(len, names)) > 3 else 0, ha="right")
        ax.set_yticks(range(n), names)
        for t in range(n):
            for p in range(n):
                if matrix[t, p]:
                    colour = "white" if shares[t, p] > 0.5 else "black"
                    ax.text(p, t, f"{int(matrix[t, p])}", ha="center", va="center", fontsize=8, color=colour)
    accuracy = run.best["metrics"]["val/acc"]
    ax.set(title=f"Confusion matrix, best epoch {run.best['epoch']} (accuracy {accuracy:.4f})",
           xlabel="predicted class", ylabel="true class")
    _save(fig, path)


def _plot_per_label(plt, run: RunRecords, scores: list[LabelScores], path: Path) -> None:
    """Average precision, AUROC and F1 of each label (the lowest by AP when there are many)."""
    shown = scores if len(scores) <= MAX_BARS else sorted(scores, key=lambda s: s.average_precision)[:MAX_BARS]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.42 * len(shown) + 1.2)))
    y = np.arange(len(shown))
    for offset, key, label in ((-0.27, "average_precision", "AP"), (0.0, "auroc", "AUROC"), (0.27, "f1", "F1")):
        ax.barh(y + offset, [getattr(s, key) for s in shown], height=0.27, label=label)
    ax.set_yticks(y, [s.name for s in shown])
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    mean_ap = run.best["metrics"].get("val/map_macro", float("nan"))
    ax.set(title=f"Per label, best epoch {run.best['epoch']} (mAP {mean_ap:.3f})", xlabel="score", ylabel="label")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    _save(fig, path)


def _class_counts(run: RunRecords) -> list[str]:
    """Samples per class (multi-label: images per label) of each split, when the data says."""
    counts = (run.last or run.best).get("class_counts") or {}
    splits = [(name, counts.get(name) or []) for name in ("train", "val")]
    if not any(values for _, values in splits):
        return []
    kind = "label" if run.multilabel else "class"
    lines = [f"## Samples per {kind}", "", f"| {kind} | " + " | ".join(name for name, _ in splits) + " |",
             "| --- | " + " | ".join("---:" for _ in splits) + " |"]
    for i, name in enumerate(run.class_names):
        cells = [str(values[i]) if i < len(values) else "?" for _, values in splits]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    with atomic_file.replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format=path.suffix.lstrip("."))
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)


def _launches(launches: list[dict[str, Any]]) -> list[str]:
    """A line on how each launch ran, when the run was resumed on another number of processes."""
    if len({(launch["world_size"], launch["grad_accum_steps"]) for launch in launches}) < 2:
        return []
    return ["- launches: " + "; ".join(f"from step {launch['step']}, {launch['world_size']} process(es) x "
                                      f"{launch['grad_accum_steps']} accumulation" for launch in launches)]


def _resolution(cfg: dict) -> str:
    """Training and evaluation sizes, and the test-time augmentation validation used."""
    data = config_from_dict(cfg).data
    train = (f"{data.progressive_start_size} -> {data.image_size} px (progressive)"
             if data.progressive_start_size else f"{data.image_size} px")
    tta = "flip TTA (the mean of each image's and its mirror's logits)" if data.tta == "flip" else "no TTA"
    return f"training crop {train}; evaluated at {eval_geometry(data).crop} px, {tta}"


def _distilled(teacher: dict[str, Any] | None) -> list[str]:
    if not teacher:
        return []
    return [f"- distilled from {teacher['source']} (sha256 {teacher['sha256'][:12]}...): alpha {teacher['alpha']:g}, "
            f"temperature {teacher['temperature']:g}; the metrics are the student's"]


def _summary(run: RunRecords, table: str) -> str:
    cfg = run.best["config"]
    best, last = run.best, run.last or run.best
    layout = run.layout
    rates = [r["train/images_per_sec"] for r in run.val if "train/images_per_sec" in r]
    seconds = sum(r.get("train/epoch_seconds", 0.0) for r in run.val)
    epochs_run = sum("train/epoch_loss" in r for r in run.val)
    lines = [
        f"# Run summary: {cfg['train']['output_dir']}",
        "",
        f"- best epoch: {best['epoch']} (step {best['step']}) by {best['monitor']} "
        f"= {best['metrics'][best['monitor']]:.4f}",
        f"- epochs run: {epochs_run} of {cfg['train']['epochs']}"
        + (f", stopped early: {best['monitor']} did not improve for {cfg['train']['early_stop_patience']} "
           f"validations after step {best['step']}" if last.get("stopped_early") else "")
        + f"; training time {seconds:.1f} s" + (f"; median {np.median(rates):.0f} images/s" if rates else ""),
        f"- model {cfg['model']['name']}, {len(run.class_names)} {'labels' if run.multilabel else 'classes'}; "
        f"loss {cfg['loss']['name']}; sampling {cfg['data'].get('sampling', 'uniform')}; "
        f"optimizer {cfg['optim']['name']} lr {cfg['optim']['lr']}; schedule {cfg['sched']['name']}",
        f"- {layout['world_size']} process(es), global batch {layout['global_batch']} "
        f"({layout['batch_size']} per process x {layout['grad_accum_steps']} accumulation), "
        f"base LR {layout['base_lr']:.6g}, mixed precision {last.get('mixed_precision', 'no')}",
        *_launches(last.get("launches", [])),
        f"- {_resolution(cfg)}",
        *_distilled(last.get("distill")),
        "",
        "| metric | best epoch | last epoch |",
        "| --- | --- | --- |",
        *(f"| {k} | {best['metrics'][k]:.4f} | {last['metrics'][k]:.4f} |" for k in best["metrics"]),
        "",
        "## Per label (best epoch)" if run.multilabel else "## Per class (best epoch)",
        "",
        "```",
        table,
        "```",
        "",
        *_class_counts(run),
        "## Plots",
        "",
        *(f"![{p}]({p})" for p in run.plot_names),
        "",
    ]
    return "\n".join(lines)
