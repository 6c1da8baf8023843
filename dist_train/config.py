"""The typed config tree: dataclasses, loaded from YAML and dotted command-line overrides.

    cfg = load_config("configs/digits_cpu.yaml", ["optim.lr=0.05", "train.epochs=3"])

Every key is declared below with its type and default. Unknown keys, values of the wrong type
and contradictory settings raise `ConfigError` naming the dotted key, so a typo fails before
any process starts training. The resolved tree is written to `config.yaml` in each run
directory (`to_dict`), which `load_config` reads back unchanged.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_train import atomic_file
from dist_train.errors import ConfigError


def applied_on_resume(note: str = "") -> dict[str, str]:
    """Field metadata: a resumed run applies this key's new value (training/resume_config.py);
    `note` says what follows in the run log. Every other key must keep the checkpoint's value."""
    return {"applied_on_resume": note}


RESUME_APPLIES_SECTIONS = ("tracking",)  # sections whose every key a resumed run applies


@dataclass
class DataConfig:
    # A dataset directory written by `dist-train make-shards` (its dataset.json picks the
    # split), a brace pattern such as "data/train-{000000..000007}.tar", a glob, or a list.
    train: str | list[str] = field(default="", metadata=applied_on_resume())
    val: str | list[str] = field(default="", metadata=applied_on_resume())
    num_classes: int = 0  # 0: take it from dataset.json
    # multiclass: one label per image (`.cls` "3"); multilabel: a list per image (`.cls` "3,7",
    # or a `.json` member [3, 7]), trained with loss.name=bce or asl, scored by val/map_macro...
    task: Literal["multiclass", "multilabel"] = "multiclass"
    allow_empty_labels: bool = True  # multilabel: an image with no label (a `.cls` of "") is data
    class_names: list[str] | None = None  # None: from dataset.json, else "0".."n-1"
    batch_size: int = field(  # per process, per micro-step
        default=64, metadata=applied_on_resume("the global batch is kept, the accumulation steps follow"))
    val_batch_size: int | None = field(default=None, metadata=applied_on_resume())  # None: same as batch_size
    num_workers: int = field(  # DataLoader worker processes per training process
        default=2, metadata=applied_on_resume())
    image_size: int = 224  # the training crop (RandomResizedCrop), a square of this side
    # Evaluation (validation, eval, predict, export): resize the short side to val_resize_size,
    # then center-crop val_crop_size (torchvision's eval preset: 232 then 224). null: the crop
    # is image_size and the resize floor(crop / crop_pct), as timm's crop_pct (0.875: 224 -> 256).
    val_crop_size: int | None = None
    val_resize_size: int | None = None
    crop_pct: float = 0.875
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"  # of every resize and crop, train and eval
    # Progressive resizing (data/resolution.py; FFCV's ResNet-50 recipe): the training crop grows
    # from progressive_start_size at progressive_start_epoch to image_size at
    # progressive_end_epoch (null: the last epoch), in multiples of progressive_step, per
    # optimizer step. 0: image_size throughout.
    progressive_start_size: int = 0
    progressive_start_epoch: float = 0.0
    progressive_end_epoch: float | None = None
    progressive_step: int = 32
    # Test-time augmentation of validation, eval and predict: flip, the mean of the logits of
    # each image and its mirror. none: the image alone.
    tta: Literal["none", "flip"] = "none"
    channels: Literal[1, 3] = 3  # images are converted to grayscale (1) or RGB (3)
    # per channel, of pixels in [0, 1] (ImageNet's)
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # per channel: x -> (x - mean) / std
    # none: resize only; light: small affine jitter (digits, documents);
    # standard: random-resized crop and horizontal flip (natural images);
    # randaugment, trivialaugment, autoaugment: standard, then that torchvision policy
    augment: Literal["none", "light", "standard", "randaugment", "trivialaugment", "autoaugment"] = "standard"
    random_erasing: float = 0.0  # probability of erasing a random rectangle of a training image
    # Mixup / CutMix of training micro-batches (dist_train/recipe/mixing.py): Beta(alpha, alpha) mixing
    # ratios, 0 turns one off; the probability a micro-batch is mixed; with both on, the
    # probability of CutMix rather than Mixup.
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    mix_switch_prob: float = 0.5
    shuffle_buffer: int = 1000  # training samples are shuffled within windows of this many
    # Repeated augmentation (Hoffer et al. 2020; DeiT's RASampler, timm's --aug-repeats): an
    # epoch reads about N/k distinct samples k times each, every copy augmented on its own and
    # in another micro-batch of the same optimizer step (another process when there are >= k).
    # 1: off. A step holds ceil(G / (k C)) x C distinct samples (G: the global batch, C: the
    # run's first process count), the last ones k - 1 times where k copies do not all fit.
    repeated_augment: int = 1
    # Which training samples an epoch reads (data/sampling.py). uniform: each once. With
    # replacement, drawn per epoch from (seed, epoch) alone: balanced (every class equally
    # often), sqrt (class frequency ~ the square root of its count), weights (each sample of
    # class c drawn with weight sampling_weights[c], as WeightedRandomSampler's weights).
    sampling: Literal["uniform", "balanced", "sqrt", "weights"] = "uniform"
    sampling_weights: list[float] | None = None
    samples_per_epoch: int = 0  # samples drawn per epoch when sampling; 0: the training set's size
    # Damaged data: raise stops the run naming shard and sample; skip leaves damaged samples
    # and shards out, counts them (metrics.jsonl `data/skipped_samples`) and stops only past
    # max_skipped. Skip scans every shard's headers and labels at start-up.
    on_error: Literal["raise", "skip"] = field(
        default="raise",
        metadata=applied_on_resume("damaged samples left out from here on change the order from here on"))
    max_skipped: int = field(default=100, metadata=applied_on_resume())
    # An image declaring more pixels is damaged data (a decompression bomb), never decoded.
    max_image_pixels: int = field(default=89_478_485, metadata=applied_on_resume())  # PIL's own default limit
    # JPEG decoded, and the transforms applied, on the training device (nvjpeg on a GPU) rather
    # than in the DataLoader workers: for large images, where CPU decoding starves the GPU.
    # JPEG images only; the same crops and flips, pixels not bit-for-bit the CPU decoder's.
    decode_on_device: bool = field(
        default=False,
        metadata=applied_on_resume("images decoded by another decoder: the same crops, pixels rounded apart"))
    # Remote shards (https://, http://, s3://) are fetched ahead of use into this node-local
    # directory ("": dist-train-shards-<uid> in the system's temporary directory), shared by
    # the node's processes and never holding more than cache_limit ("20GB", "512MiB", bytes).
    cache_dir: str = ""
    cache_limit: int | str = "20GB"


@dataclass
class ModelConfig:
    name: str = "resnet18"  # any torchvision classification model, or "small_cnn"
    # Start from these weights instead of random ones (dist_train/recipe/pretrained.py): a .safetensors
    # or torch state-dict file (.pth/.pt/.bin), a dist-train checkpoint such as RUN/best, or
    # hf-hub:<repo> from the local Hugging Face cache. Never downloaded. A head for another
    # class count starts anew.
    weights: str | None = None
    # Train only the classifier head at first: "backbone" freezes everything else for
    # `freeze_epochs` epochs (null: the whole run), then all of it trains. A frozen parameter's
    # gradient is dropped before the optimizer step: it is not updated and its optimizer state
    # does not move. (BatchNorm statistics of a frozen backbone still follow the data.)
    freeze: Literal["none", "backbone"] = "none"
    freeze_epochs: float | None = None
    sync_batchnorm: bool = False  # batch statistics over all processes (small per-GPU batches)
    # NHWC memory layout: faster convolutions on tensor-core GPUs, and with oneDNN on CPUs too
    # (torch 2.14, 2 cores: a train step 1.01-1.08x as fast, small_cnn to resnet50; benchmarks/RESULTS.md).
    # configs/digits_cpu.yaml turns it on; FSDP refuses it.
    channels_last: bool = field(default=False, metadata=applied_on_resume())
    # Keyword arguments of the model's constructor: timm.create_model's (drop_path_rate,
    # drop_rate, img_size, ...) or a torchvision builder's (stochastic_depth_prob, dropout, ...).
    # Recorded with the config in every checkpoint, so eval, predict and export rebuild the same.
    kwargs: dict[str, Any] = field(default_factory=dict)
    # Recompute each block's activations in the backward pass instead of keeping them (timm's
    # set_grad_checkpointing, or torch's checkpoint wrapper around each block of another model):
    # less memory, about a third more compute. Under DDP and FSDP alike.
    grad_checkpointing: bool = field(default=False, metadata=applied_on_resume())


@dataclass
class LossConfig:
    # multiclass: cross_entropy, label_smoothing, focal, or bce (one-vs-rest binary cross-entropy
    # on one-hot or mixed targets, timm's BinaryCrossEntropy, "ResNet strikes back");
    # multilabel: bce (per label) or asl (asymmetric loss, Ridnik et al. 2021).
    name: Literal["cross_entropy", "label_smoothing", "focal", "bce", "asl"] = "cross_entropy"
    label_smoothing: float = 0.1  # used by "label_smoothing", and by "bce" on multiclass data
    # bce on multiclass data: a target above this becomes 1, the rest 0 (timm's --bce-target-thresh;
    # mixed targets then count both images as present). null: the targets as they are.
    bce_target_threshold: float | None = None
    focal_gamma: float = 2.0  # used by "focal"
    focal_alpha: list[float] | None = None  # per-class weights for "focal"
    # cross_entropy and label_smoothing: a weight per class, or "auto" (n / (classes x n_c), from
    # the training set's class counts, sklearn's "balanced"). null: none.
    class_weights: str | list[float] | None = None
    asl_gamma_neg: float = 4.0  # asl: focusing of the negatives (the paper's defaults)
    asl_gamma_pos: float = 0.0  # asl: focusing of the positives
    asl_clip: float = 0.05  # asl: a negative's probability is shifted down by this (0: none)


@dataclass
class OptimConfig:
    # sgd and adamw are torch's; any other name is timm's optimizer factory's
    # (timm.optim.create_optimizer_v2: lamb, lars, lion, adopt, nadamw, rmsproptf, adafactor, ...).
    name: str = "sgd"
    lr: float = 0.1  # the peak LR, after warmup (scaled by lr_base_batch when set)
    momentum: float = 0.9  # SGD's momentum (timm's optimizers that take one)
    nesterov: bool = False  # SGD with Nesterov momentum
    weight_decay: float = 5e-4  # decoupled for AdamW and timm's; L2 for SGD
    betas: list[float] | None = None  # null: the optimizer's own (AdamW's 0.9, 0.999; Lion's 0.9, 0.99)
    eps: float | None = None  # null: the optimizer's own default
    # Weight decay on biases and normalization parameters rarely helps and often hurts.
    decay_norm_and_bias: bool = False
    # Fine-tuning: the classifier head's LR multiplier, and layer-wise LR decay (BEiT, timm):
    # layer i of L (input side first) trains at lr * layer_decay^(L-1-i). null: none.
    head_lr_mult: float = 1.0
    layer_decay: float | None = None
    # Linear LR scaling: `lr` is meant for this global batch (processes x accumulation x
    # batch_size) and is multiplied by actual_global_batch / lr_base_batch. null: no scaling.
    lr_base_batch: int | None = None


@dataclass
class SchedConfig:
    # linear: from the peak (after warmup) straight down to min_lr at the last step
    name: Literal["constant", "step", "cosine", "linear", "plateau"] = "cosine"
    warmup_epochs: float = 0.0  # linear warmup in front of step, cosine or linear
    warmup_start_factor: float = 0.01  # the warmup starts at lr x this
    step_size_epochs: float = 30.0  # step: multiply by gamma every step_size_epochs
    gamma: float = 0.1  # step: the LR's factor at each step
    min_lr: float = 0.0  # cosine and linear: the LR reached at the last step
    plateau_factor: float = 0.1  # plateau: multiply by this when the metric stalls
    plateau_patience: int = 5  # plateau: validations without improvement before a cut
    plateau_monitor: str = "val/loss"  # plateau: the metric it watches
    plateau_mode: Literal["min", "max"] = "min"  # plateau: min (a loss) or max (an accuracy)


@dataclass
class TrainConfig:
    # training epochs
    epochs: int = field(default=10, metadata=applied_on_resume("the LR schedule is re-planned for the new length"))
    # the run directory: checkpoints, metrics.jsonl, plots
    output_dir: str = field(default="runs/default", metadata=applied_on_resume())
    seed: int = 0  # the data order, augmentation, initialization and dropout: a run is a function of it
    grad_accum_steps: int = field(  # micro-batches per optimizer step
        default=1, metadata=applied_on_resume("the global batch is kept, the accumulation steps follow"))
    # null: use the accelerate launch config's setting (or "no" without one).
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    clip_grad_norm: float | None = field(  # clip the gradients' global norm to this (null: no clipping)
        default=None, metadata=applied_on_resume("clipping changes from the resume step on"))
    monitor: str = "val/f1_macro"  # metric that picks the best checkpoint
    # val/auroc_macro, exact: every validation prediction is kept, gathered on every rank and
    # sorted per class (50,000 images x 1,000 classes: the metrics hold 199 MB and take 12.2 s of
    # a validation on 2 CPU cores, 7.8 MB and 1.7 s without; benchmarks/RESULTS.md). false: not
    # computed, and a multi-class validation keeps summed counts only. Multi-label runs keep
    # their predictions for mAP and compute it with them.
    auroc: bool = field(default=True, metadata=applied_on_resume())
    threshold: float = 0.5  # multilabel: a label is predicted when its probability is at least this
    monitor_mode: Literal["min", "max"] = "max"  # max for accuracies and F1, min for a loss
    log_every_steps: int = field(  # train records in metrics.jsonl, every N optimizer steps
        default=50, metadata=applied_on_resume())
    # Validation (and the choice of best/) after every epoch, and also every N optimizer steps
    # when set: for long epochs, or runs measured in steps.
    val_every_steps: int | None = field(default=None, metadata=applied_on_resume())
    # An exponential moving average of the weights, updated after every optimizer step and
    # validated beside them (val_ema/*): null (none), or its decay, e.g. 0.9998 (timm's recipes).
    ema_decay: float | None = None
    ema_warmup: bool = False  # a lower decay over the first updates (timm ModelEmaV3's warmup)
    # Update the average after every N-th optimizer step only (torchvision's --model-ema-steps).
    ema_every_steps: int = 1
    # none: ema_decay is the decay of each update. torchvision: it is rescaled as torchvision's
    # reference script does, 1 - min(1, (1 - decay) x global batch x ema_every_steps / epochs).
    ema_adjust: Literal["none", "torchvision"] = "none"
    # The average copies the weights, rather than averaging them, until the LR warmup is over
    # (torchvision's reference script): the warmup's early weights never enter it.
    ema_copy_in_warmup: bool = False
    # End the run (exit 0, best/ and last/ written) after this many validations in a row without
    # an improvement of `monitor`. null: never.
    early_stop_patience: int | None = field(
        default=None, metadata=applied_on_resume("validations without improvement so far still count"))
    # progress: tqdm bars on a terminal, else (a Slurm log, nohup) a line per train.log_every_steps
    # and, for a validation that takes longer than 10 s, a line every 10 s
    progress_bar: bool = field(default=True, metadata=applied_on_resume())
    cpu: bool = field(default=False, metadata=applied_on_resume())  # force the CPU even where CUDA is available
    # torch.compile the model (after the DDP wrap). Validation runs the uncompiled module: compiling
    # it too cost more than it saved on the digits config (README, "Recipe options").
    compile: bool = field(default=False, metadata=applied_on_resume())
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = field(
        default="default", metadata=applied_on_resume())
    # How the processes share the model. ddp: each holds all of it (DistributedDataParallel).
    # fsdp: its parameters, gradients and optimizer state are sharded over them (FSDP2's
    # fully_shard per block and the root; dist_train/runtime/fsdp.py). hsdp: sharded within
    # groups of train.hsdp_shard_size processes, replicated across the groups. Checkpoints are
    # the same under each: a run resumes under another, on any number of processes. One
    # process trains unsharded.
    parallel: Literal["ddp", "fsdp", "hsdp"] = field(default="ddp", metadata=applied_on_resume())
    # hsdp: processes per shard group; 0: the processes of a node (shard within a node,
    # replicate across nodes).
    hsdp_shard_size: int = field(default=0, metadata=applied_on_resume())
    # Resumable checkpoints (RUN/checkpoints/step-N): every N optimizer steps (null: never
    # mid-epoch), at each epoch end, the newest `keep_checkpoints` kept.
    checkpoint_every_steps: int | None = field(default=None, metadata=applied_on_resume())
    checkpoint_every_epoch: bool = field(default=True, metadata=applied_on_resume())
    keep_checkpoints: int = field(default=2, metadata=applied_on_resume())
    # Model checkpoints of the k best validations by `monitor` in RUN/top/step-N (best/ is the
    # best of them); 1: best/ alone.
    keep_best: int = field(default=1, metadata=applied_on_resume())
    # null: a fresh run; "auto": continue from the newest good checkpoint in output_dir if
    # there is one (else start fresh); or the path of a checkpoint directory.
    resume: str | None = field(default=None, metadata=applied_on_resume())


@dataclass
class DistillConfig:
    # Knowledge distillation (dist_train/recipe/distill.py): the loss becomes
    # (1 - alpha) x the task loss + alpha x T^2 KL(teacher || student) at temperature T.
    # teacher: a dist-train model checkpoint (RUN/best), or with teacher_weights a model name as
    # model.name takes (timm/<name>, a torchvision model) and its local weights file (.safetensors
    # or .pth, head included). null: no distillation.
    teacher: str | None = None
    teacher_weights: str | None = None
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # a named teacher's constructor options
    alpha: float = 0.5  # DeiT's --distillation-alpha
    temperature: float = 1.0  # DeiT's --distillation-tau; timm suggests 1-4


@dataclass
class TrackingConfig:  # every key applies on resume (RESUME_APPLIES_SECTIONS)
    wandb: bool = True  # log to wandb as well as metrics.jsonl (main process only)
    project: str = "dist-train"  # the wandb project
    run_name: str | None = None  # None: the output directory's name
    tags: list[str] = field(default_factory=list)  # wandb tags
    # auto: online when a W&B API key is configured, else offline (files under RUN/wandb/)
    mode: Literal["auto", "online", "offline"] = "auto"
    plots: bool = True  # PNG plots and summary.md in the run directory at the end
    tensorboard: bool = False  # TensorBoard event files in RUN/tensorboard as well
    mlflow: bool = False  # an MLflow run as well (the project is its experiment)
    mlflow_uri: str = ""  # MLflow's tracking URI; "": a file store in RUN/mlruns (offline)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


MAX_IMAGE_SIZE = 16_384  # pixels a side: beyond any classifier's input, and a batch would not fit in memory
# Ceilings far above any real setting, below what overflows: a larger value is a typo or an attack.
MAX_LR = 100.0  # large-batch SGD (LARS) peaks near 30; past this, only divergence or float overflow
MAX_WEIGHT_DECAY = 10.0
MAX_EPOCHS = 1_000_000
MAX_WORKERS = 256  # DataLoader workers per training process
MAX_CLASSES = 1_000_000
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_LR_MULT = 1000.0  # a head at 10-100x the backbone's LR is usual; 1000x is already extreme
MAX_CLASS_WEIGHT = 1e6  # a class weighed a million times another is already beyond any real use
MAX_ALPHA = 100.0  # Beta(alpha, alpha) is near 0.5 long before; recipes use 0.1 to 1
MAX_CONFIG_VALUES = 100_000  # far above any real config; bounds what an alias bomb can cost
MAX_REPEATS = 32  # repeated augmentation: recipes use 2-4
# model.kwargs that dist-train itself passes to the constructor, or that would make it read files
# (timm's checkpoint_path loads a pickle: weights come through model.weights, checked, only)
MODEL_KWARGS_OWNED = {"num_classes": "data.num_classes", "in_chans": "data.channels",
                      "pretrained": "model.weights", "weights": "model.weights", "checkpoint_path": "model.weights",
                      "pretrained_cfg": "model.weights", "pretrained_cfg_overlay": "model.weights",
                      "cache_dir": "model.weights", "features_only": "model.name (a classifier)"}

METRIC_NAMES = (
    "val/acc",
    "val/acc_top5",  # with more than 5 classes
    "val/f1_macro",
    "val/precision_macro",
    "val/recall_macro",
    "val/auroc_macro",
    "val/loss",
)
MULTILABEL_METRIC_NAMES = (
    "val/map_macro",  # mean over labels of average precision
    "val/f1_micro",
    "val/f1_macro",
    "val/auroc_macro",
    "val/subset_acc",  # every label of the image right
    "val/loss",
)
EMA_PREFIX = "val_ema/"  # the same metrics of the weights' moving average (train.ema_decay)


def metric_names(task: str) -> tuple[str, ...]:
    return MULTILABEL_METRIC_NAMES if task == "multilabel" else METRIC_NAMES


TOP_K = 5  # val/acc_top5: the right class among the 5 highest scores


def check_metrics_measured(cfg: Config, num_classes: int) -> None:
    """A monitored metric the dataset cannot have: top-5 accuracy with 5 classes or fewer."""
    for key, metric in (("train.monitor", cfg.train.monitor), ("sched.plateau_monitor", cfg.sched.plateau_monitor)):
        if metric.endswith(f"acc_top{TOP_K}") and num_classes <= TOP_K:
            raise ConfigError(f"{key}={metric}: the dataset has {num_classes} classes; top-{TOP_K} accuracy "
                              f"needs more than {TOP_K}")


def ema_metric_names(task: str) -> tuple[str, ...]:
    return _of_ema(metric_names(task))


def _of_ema(names: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(EMA_PREFIX + name.removeprefix("val/") for name in names)


EMA_METRIC_NAMES = _of_ema(METRIC_NAMES)
ALL_METRIC_NAMES = tuple(dict.fromkeys(METRIC_NAMES + MULTILABEL_METRIC_NAMES))
ALL_EMA_METRIC_NAMES = _of_ema(ALL_METRIC_NAMES)
MULTILABEL_LOSSES = ("bce", "asl")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (optional), apply `key.sub=value` overrides, validate."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = _read_yaml(Path(path))
    for item in overrides or []:
        key, value = _parse_override(item)
        _set_dotted(tree, key, value)
    cfg = _build(Config, tree, prefix="")
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a config saved by `to_dict` (e.g. from a checkpoint's meta.json)."""
    cfg = _build(Config, tree, prefix="")
    validate(cfg)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    atomic_file.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def validate(cfg: Config) -> None:
    """Checks that span several keys; single-key types are checked while building."""
    _check_finite(cfg, "")
    _check_ranges(cfg)
    try:
        parse_bytes(cfg.data.cache_limit)
    except ValueError as exc:
        raise ConfigError(f"data.cache_limit: {exc}") from None
    for key in ("data.mean", "data.std"):
        values = cfg.data.mean if key == "data.mean" else cfg.data.std
        if len(values) not in (1, cfg.data.channels):
            raise ConfigError(
                f"{key} has {len(values)} values; data.channels is {cfg.data.channels}"
            )
    if any(s <= 0 for s in cfg.data.std):
        raise ConfigError("data.std values must be positive")
    if cfg.optim.betas is not None and len(cfg.optim.betas) != 2:
        raise ConfigError("optim.betas must hold two values (or null)")
    if not 0.0 <= cfg.loss.label_smoothing < 1.0:
        raise ConfigError("loss.label_smoothing must be in [0, 1)")
    if cfg.loss.focal_gamma < 0:
        raise ConfigError("loss.focal_gamma must be >= 0")
    alpha = cfg.loss.focal_alpha
    if alpha is not None and cfg.data.num_classes and len(alpha) != cfg.data.num_classes:
        raise ConfigError(f"loss.focal_alpha has {len(alpha)} values; data.num_classes is {cfg.data.num_classes}")
    if (cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0) and cfg.loss.name == "focal":
        raise ConfigError("data.mixup_alpha / data.cutmix_alpha make soft labels, which loss.name=focal does not "
                          "take; use cross_entropy or label_smoothing")
    if not re.fullmatch(r"[a-z0-9_]+", cfg.optim.name):
        raise ConfigError(f"optim.name: {quoted(cfg.optim.name)} is not an optimizer name (sgd, adamw, or one of "
                          "timm's: lamb, lars, lion, adopt, nadamw, rmsproptf, ...)")
    _check_owned_kwargs(cfg.model.kwargs, "model.kwargs", "model.weights")
    if cfg.train.ema_decay is None and (cfg.train.ema_adjust != "none" or cfg.train.ema_copy_in_warmup):
        raise ConfigError("train.ema_adjust and train.ema_copy_in_warmup are about train.ema_decay, which is null")
    _check_progressive(cfg)
    _check_distill(cfg)
    _check_parallel(cfg)
    if cfg.sched.name == "plateau" and cfg.sched.warmup_epochs > 0:
        raise ConfigError("sched.warmup_epochs is supported with step, cosine and linear, not plateau")
    task = cfg.data.task
    names = metric_names(task) + ema_metric_names(task)
    for key, metric in (("train.monitor", cfg.train.monitor),
                        ("sched.plateau_monitor", cfg.sched.plateau_monitor)):
        if metric in ema_metric_names(task) and cfg.train.ema_decay is None:
            raise ConfigError(f"{key}={metric} needs train.ema_decay (the moving average it measures)")
        if metric not in names:
            raise ConfigError(f"{key}: unknown metric {metric!r} for data.task={task}; choose from {names}")
        if metric.endswith("/auroc_macro") and not cfg.train.auroc and task == "multiclass":
            raise ConfigError(f"{key}={metric} needs train.auroc=true (train.auroc=false does not compute it)")
    _check_task(cfg)


def _check_parallel(cfg: Config) -> None:
    """What FSDP does not do (yet), refused before any process starts a worker."""
    t = cfg.train
    if t.parallel == "ddp":
        return
    # (key, set, why, what else gives the run the same sharding)
    refused = [("train.ema_decay", t.ema_decay is not None, "a moving average of sharded weights is not built",
                "train.ema_decay=null"),
               ("train.compile", t.compile, "compiling a sharded model is not built", "train.compile=false"),
               ("model.sync_batchnorm", cfg.model.sync_batchnorm, "sync BatchNorm is DDP's",
                "model.sync_batchnorm=false"),
               ("model.channels_last", cfg.model.channels_last,
                "FSDP2 shards contiguous parameters only (torch 2.14), and NHWC weights are not",
                "model.channels_last=false"),
               ("train.mixed_precision=fp16", t.mixed_precision == "fp16",
                "FSDP's mixed precision here is bf16 (no sharded loss scaling)", "train.mixed_precision=bf16")]
    for key, present, why, instead in refused:
        if present:
            raise ConfigError(f"{key} under train.parallel={t.parallel}: {why}; use {instead}, or train.parallel=ddp")


def _check_progressive(cfg: Config) -> None:
    d = cfg.data
    if not d.progressive_start_size:
        return
    end = d.progressive_end_epoch if d.progressive_end_epoch is not None else cfg.train.epochs
    if not d.progressive_start_epoch < end <= cfg.train.epochs:
        raise ConfigError(f"data.progressive_end_epoch ({end:g}) must come after data.progressive_start_epoch "
                          f"({d.progressive_start_epoch:g}), by train.epochs={cfg.train.epochs} at the latest")
    if d.decode_on_device:
        raise ConfigError("data.progressive_start_size needs the workers' transforms: data.decode_on_device "
                          "crops at one size")


MAX_TEMPERATURE = 100.0  # KD temperatures are 1-20; far beyond, every distribution is uniform


def _check_distill(cfg: Config) -> None:
    k = cfg.distill
    if k.teacher is None:
        if k.teacher_weights is not None or k.teacher_kwargs:
            raise ConfigError("distill.teacher_weights and distill.teacher_kwargs are the teacher's: "
                              "distill.teacher is null")
        return
    if not 0 < k.alpha <= 1:
        raise ConfigError(f"distill.alpha must be in (0, 1] (the distillation term's weight), got {k.alpha}")
    if not 0 < k.temperature <= MAX_TEMPERATURE:
        raise ConfigError(f"distill.temperature must be in (0, {MAX_TEMPERATURE:g}], got {k.temperature}")
    if cfg.data.task != "multiclass":
        raise ConfigError("distill.teacher: logit distillation (a softmax over classes) is for data.task=multiclass")
    if k.teacher_kwargs and k.teacher_weights is None:
        raise ConfigError("distill.teacher_kwargs are a named teacher's (with distill.teacher_weights); a "
                          "checkpoint teacher is rebuilt from its own config")
    _check_owned_kwargs(k.teacher_kwargs, "distill.teacher_kwargs", "distill.teacher_weights")


def _check_owned_kwargs(kwargs: dict[str, Any], key: str, weights_key: str) -> None:
    """No constructor argument that dist-train sets itself (MODEL_KWARGS_OWNED), or that would
    read weights past `weights_key`'s checks."""
    for name, owner in MODEL_KWARGS_OWNED.items():
        if name in kwargs:
            raise ConfigError(f"{key}.{name} is set by dist-train from {owner.replace('model.weights', weights_key)}")


def _check_task(cfg: Config) -> None:
    """Losses, sampling and class weights that fit the task."""
    d, loss = cfg.data, cfg.loss
    if (loss.name in MULTILABEL_LOSSES) != (d.task == "multilabel") and loss.name != "bce":
        fitting = "bce or asl" if d.task == "multilabel" else "cross_entropy, label_smoothing, focal or bce"
        raise ConfigError(f"loss.name={loss.name} does not fit data.task={d.task}; use {fitting}")
    if loss.bce_target_threshold is not None and not (loss.name == "bce" and d.task == "multiclass"):
        raise ConfigError("loss.bce_target_threshold is for loss.name=bce on data.task=multiclass "
                          "(multi-label targets are 0 or 1 already)")
    if d.task == "multilabel":
        if d.mixup_alpha > 0 or d.cutmix_alpha > 0:
            raise ConfigError("data.mixup_alpha / data.cutmix_alpha are for data.task=multiclass")
        if d.sampling != "uniform":
            raise ConfigError(f"data.sampling={d.sampling} draws by class, which needs one label per image; "
                              "with data.task=multilabel use uniform (and loss.name=asl for imbalance)")
    if d.samples_per_epoch < 0:
        raise ConfigError(f"data.samples_per_epoch must be >= 0, got {d.samples_per_epoch}")
    if d.samples_per_epoch and d.sampling == "uniform":
        raise ConfigError("data.samples_per_epoch sets the length of a sampled epoch: it needs data.sampling "
                          "balanced, sqrt or weights (a uniform epoch reads every sample once)")
    if (d.sampling == "weights") != (d.sampling_weights is not None):
        raise ConfigError("data.sampling=weights takes its weights from data.sampling_weights (one per class), "
                          "and only it does")
    checked = [("data.sampling_weights", d.sampling_weights)]
    weights = loss.class_weights
    if isinstance(weights, str) and weights != "auto":
        raise ConfigError(f"loss.class_weights: {quoted(weights)} is not 'auto', a list of weights, or null")
    if weights is not None and loss.name not in ("cross_entropy", "label_smoothing"):
        raise ConfigError(f"loss.class_weights is for cross_entropy and label_smoothing; loss.name={loss.name} "
                          + ("has loss.focal_alpha" if loss.name == "focal" else "does not take it"))
    if isinstance(weights, list):
        checked.append(("loss.class_weights", weights))
    for key, values in checked:
        if values is None:
            continue
        if cfg.data.num_classes and len(values) != cfg.data.num_classes:
            raise ConfigError(f"{key} has {len(values)} values; data.num_classes is {cfg.data.num_classes}")
        if any(not 0 <= v <= MAX_CLASS_WEIGHT for v in values) or not any(v > 0 for v in values):
            raise ConfigError(f"{key} must be in [0, {MAX_CLASS_WEIGHT:g}], with at least one positive")


def parse_bytes(text: int | str) -> int:
    """A size such as data.cache_limit ("20GB", "512MiB", "100000000") in bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    stripped = str(text).strip().upper().replace(" ", "")
    number = stripped.rstrip("KMGTIB")
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if stripped[len(number):] not in units or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a size such as 20GB, 512MiB or a number of bytes")
    return int(value * units[stripped[len(number):]])


def _check_finite(node: Any, prefix: str) -> None:
    """No NaN or infinity anywhere: a run would train on NaN arithmetic to the end."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_finite(value, key + ".")
        for item_key, item in _leaves(value, key):
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{item_key} must be a finite number, got {item}")


def _leaves(value: Any, key: str):
    """(dotted key, value) of every plain value in a list or mapping (model.kwargs), or the value."""
    if isinstance(value, dict):
        for name, item in value.items():
            yield from _leaves(item, f"{key}.{name}")
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item, key)
    else:
        yield key, value


def _check_ranges(cfg: Config) -> None:
    """Every single-key numeric rule, one row per key (key, value, holds, rule): numbers that
    torch would reject late (with a traceback) or take silently."""
    o, s, t, d = cfg.optim, cfg.sched, cfg.train, cfg.data
    rules = [
        ("data.batch_size", d.batch_size, d.batch_size > 0, "positive"),
        ("data.image_size", d.image_size, d.image_size > 0, "positive"),
        ("data.image_size", d.image_size, d.image_size <= MAX_IMAGE_SIZE, f"at most {MAX_IMAGE_SIZE}"),
        *((key, size, 0 < size <= MAX_IMAGE_SIZE, f"in [1, {MAX_IMAGE_SIZE}] (or null)")
          for key, size in (("data.val_crop_size", d.val_crop_size), ("data.val_resize_size", d.val_resize_size))
          if size is not None),
        ("data.crop_pct", d.crop_pct, 0.1 <= d.crop_pct <= 1, "in [0.1, 1]"),
        ("data.progressive_start_size", d.progressive_start_size, 0 <= d.progressive_start_size <= MAX_IMAGE_SIZE,
         f"in [0, {MAX_IMAGE_SIZE}]"),
        ("data.progressive_step", d.progressive_step, 0 < d.progressive_step <= MAX_IMAGE_SIZE,
         f"in [1, {MAX_IMAGE_SIZE}]"),
        ("data.progressive_start_epoch", d.progressive_start_epoch, 0 <= d.progressive_start_epoch <= t.epochs,
         f"in [0, train.epochs={t.epochs}]"),
        ("train.hsdp_shard_size", t.hsdp_shard_size, t.hsdp_shard_size >= 0, ">= 0 (0: a node's processes)"),
        ("data.repeated_augment", d.repeated_augment, 1 <= d.repeated_augment <= MAX_REPEATS,
         f"in [1, {MAX_REPEATS}]"),
        ("data.shuffle_buffer", d.shuffle_buffer, d.shuffle_buffer > 0, "positive"),
        ("data.max_image_pixels", d.max_image_pixels, d.max_image_pixels > 0, "positive"),
        ("data.max_skipped", d.max_skipped, d.max_skipped >= 0, ">= 0"),
        ("data.num_workers", d.num_workers, d.num_workers >= 0, ">= 0"),
        ("data.num_workers", d.num_workers, d.num_workers <= MAX_WORKERS, f"at most {MAX_WORKERS}"),
        ("data.num_classes", d.num_classes, d.num_classes >= 0, ">= 0"),
        ("data.num_classes", d.num_classes, d.num_classes <= MAX_CLASSES, f"at most {MAX_CLASSES:,}"),
        ("train.grad_accum_steps", t.grad_accum_steps, t.grad_accum_steps > 0, "positive"),
        ("train.log_every_steps", t.log_every_steps, t.log_every_steps > 0, "positive"),
        ("train.keep_checkpoints", t.keep_checkpoints, t.keep_checkpoints > 0, "positive"),
        ("train.keep_best", t.keep_best, t.keep_best > 0, "positive"),
        ("train.ema_every_steps", t.ema_every_steps, t.ema_every_steps > 0, "positive"),
        ("data.random_erasing", cfg.data.random_erasing, 0 <= cfg.data.random_erasing <= 1, "in [0, 1]"),
        ("data.mixup_alpha", cfg.data.mixup_alpha, 0 <= cfg.data.mixup_alpha <= MAX_ALPHA, f"in [0, {MAX_ALPHA:g}]"),
        ("data.cutmix_alpha", cfg.data.cutmix_alpha, 0 <= cfg.data.cutmix_alpha <= MAX_ALPHA, f"in [0, {MAX_ALPHA:g}]"),
        ("data.mix_prob", cfg.data.mix_prob, 0 <= cfg.data.mix_prob <= 1, "in [0, 1]"),
        ("data.mix_switch_prob", cfg.data.mix_switch_prob, 0 <= cfg.data.mix_switch_prob <= 1, "in [0, 1]"),
        ("train.threshold", t.threshold, 0 < t.threshold < 1, "in (0, 1)"),
        ("loss.asl_gamma_neg", cfg.loss.asl_gamma_neg, 0 <= cfg.loss.asl_gamma_neg <= 100, "in [0, 100]"),
        ("loss.asl_gamma_pos", cfg.loss.asl_gamma_pos, 0 <= cfg.loss.asl_gamma_pos <= 100, "in [0, 100]"),
        ("loss.asl_clip", cfg.loss.asl_clip, 0 <= cfg.loss.asl_clip < 1, "in [0, 1)"),
        ("optim.lr", o.lr, 0 < o.lr <= MAX_LR, f"in (0, {MAX_LR:g}]"),
        ("optim.momentum", o.momentum, 0 <= o.momentum < 1, "in [0, 1)"),
        ("optim.head_lr_mult", o.head_lr_mult, 1 / MAX_LR_MULT <= o.head_lr_mult <= MAX_LR_MULT,
         f"in [{1 / MAX_LR_MULT:g}, {MAX_LR_MULT:g}]"),
        ("optim.momentum", o.momentum, o.momentum > 0 or not (o.nesterov and o.name == "sgd"),
         "positive with optim.nesterov=true"),
        ("optim.weight_decay", o.weight_decay, 0 <= o.weight_decay <= MAX_WEIGHT_DECAY,
         f"in [0, {MAX_WEIGHT_DECAY:g}]"),
        *((f"optim.betas[{i}]", b, 0 <= b < 1, "in [0, 1)") for i, b in enumerate(o.betas or [])),
        ("sched.warmup_start_factor", s.warmup_start_factor, 0 <= s.warmup_start_factor <= 1, "in [0, 1]"),
        ("sched.gamma", s.gamma, 0 < s.gamma <= 1, "in (0, 1]"),
        ("sched.min_lr", s.min_lr, 0 <= s.min_lr <= o.lr, f"in [0, optim.lr={o.lr:g}]"),
        ("train.epochs", t.epochs, 1 <= t.epochs <= MAX_EPOCHS, f"in [1, {MAX_EPOCHS:,}]"),
        ("sched.warmup_epochs", s.warmup_epochs, 0 <= s.warmup_epochs <= t.epochs, f"in [0, train.epochs={t.epochs}]"),
        ("sched.step_size_epochs", s.step_size_epochs, 0 < s.step_size_epochs <= MAX_EPOCHS,
         f"in (0, {MAX_EPOCHS:,}]"),
        ("train.seed", t.seed, 0 <= t.seed <= MAX_SEED, f"in [0, {MAX_SEED}]"),
        ("sched.plateau_factor", s.plateau_factor, 0 < s.plateau_factor < 1, "in (0, 1)"),
        ("sched.plateau_patience", s.plateau_patience, s.plateau_patience >= 0, ">= 0"),
        *((f"loss.focal_alpha[{i}]", a, a >= 0, ">= 0") for i, a in enumerate(cfg.loss.focal_alpha or [])),
    ]
    optional_positive = {"data.val_batch_size": d.val_batch_size, "optim.lr_base_batch": o.lr_base_batch,
                         "train.checkpoint_every_steps": t.checkpoint_every_steps,
                         "train.val_every_steps": t.val_every_steps, "train.early_stop_patience": t.early_stop_patience}
    rules += [(key, value, value > 0, "positive") for key, value in optional_positive.items() if value is not None]
    if (freeze := cfg.model.freeze_epochs) is not None:
        rules.append(("model.freeze_epochs", freeze, 0 < freeze <= t.epochs,
                      f"in (0, train.epochs={t.epochs}] (or null)"))
    if o.layer_decay is not None:
        # Recipes use 0.5-0.95; far below, the early layers' LRs underflow to zero.
        rules.append(("optim.layer_decay", o.layer_decay, 0.01 <= o.layer_decay <= 1, "in [0.01, 1] (or null)"))
    if t.ema_decay is not None:
        rules.append(("train.ema_decay", t.ema_decay, 0 < t.ema_decay < 1, "in (0, 1) (or null)"))
    if o.eps is not None:
        rules.append(("optim.eps", o.eps, 0 < o.eps <= 1, "in (0, 1] (or null)"))
    if (threshold := cfg.loss.bce_target_threshold) is not None:
        rules.append(("loss.bce_target_threshold", threshold, 0 <= threshold < 1, "in [0, 1) (or null)"))
    if t.clip_grad_norm is not None:
        rules.append(("train.clip_grad_norm", t.clip_grad_norm, t.clip_grad_norm > 0, "positive (or null)"))
    for key, value, ok, rule in rules:
        if not ok:
            raise ConfigError(f"{key} must be {rule}, got {value}")


# --- building dataclasses from plain trees, with errors that name the key -----------------


class _StrictLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error, not "the last wins"."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise ConfigError(f"{quoted(key)} is given twice in one section (lines {seen[key]} and {line})")
                seen[key] = line
            except TypeError:  # an unhashable key: the schema check names it later
                continue
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        tree = yaml.load(path.read_text(), Loader=_StrictLoader) or {}  # a SafeLoader: plain values only
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_one_line(exc)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return tree


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    try:
        # YAML gives the natural reading of a command-line value: 3, 0.05, true, null, [1, 2].
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{_shown('.'.join(parts[: i + 1]))} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _check_size(tree: Any) -> None:
    """YAML anchors can make a short file expand to billions of values ("billion laughs"):
    count them, stopping at the limit, before anything walks the whole tree."""
    pending, seen = [tree], 0
    while pending:
        node = pending.pop()
        seen += 1
        if seen > MAX_CONFIG_VALUES:
            raise ConfigError(f"the config expands to more than {MAX_CONFIG_VALUES:,} values (YAML anchors?)")
        if isinstance(node, dict):
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)


def _build(cls: type, tree: Any, prefix: str) -> Any:
    if not prefix:
        _check_size(tree)
    if not isinstance(tree, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in tree:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.75)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown config key: {_shown(f'{prefix}{key}')}{hint}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in tree:
            continue
        kwargs[f.name] = _coerce(hints[f.name], tree[f.name], f"{prefix}{f.name}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else
                          f"{key}: {quoted(value)} is not a valid {_type_name(tp)}")
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads `no` as false: mixed_precision: no
            return "no"
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise ConfigError(f"{key}: {quoted(value)} is not one of {list(args)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {quoted(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:  # keyword arguments (model.kwargs): names, and plain YAML values
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of names to values, got {quoted(value)}")
        for name, item in value.items():
            if not (isinstance(name, str) and name.isidentifier()):
                raise ConfigError(f"{key}: {quoted(name)} is not a keyword argument name")
            _check_plain(item, f"{key}.{name}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # YAML reads 1 as an int; a float field accepts it
    if tp is float and isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string; the user meant a number
    # bool is a subclass of int: `true` must not pass for an int, nor 1 for a bool.
    if isinstance(value, tp) and (tp is bool or not isinstance(value, bool)):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {quoted(value)}")


def _check_plain(value: Any, key: str) -> None:
    """A value YAML can write back as it was read: None, bool, int, float, str, or lists of them."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, f"{key}[{i}]")
    elif value is not None and not isinstance(value, bool | int | float | str):
        raise ConfigError(f"{key}: {quoted(value)} is not a number, string, boolean, null or list of them")


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf|infinity)", re.IGNORECASE)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _shown(key: str) -> str:
    """A key as the user can read it in one line: odd ones (newlines, blanks) quoted."""
    return key if key.isprintable() and key.strip() == key and key else repr(key)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 120
_REPR.maxlist = _REPR.maxdict = 8
_REPR.maxlevel = 3


def quoted(value: Any) -> str:
    """A value for a one-line message: its repr, cut short (an error must stay one short line,
    whatever the value holds)."""
    return _REPR.repr(value)


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
