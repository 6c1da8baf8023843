"""The published recipes' parts, each against the library or script it comes from: train and
eval resolution (torchvision's presets, timm's crop_pct), BCE (timm's BinaryCrossEntropy), the
optimizer zoo (timm's factory), model options and activation checkpointing (timm), EMA every
N steps (torchvision's references)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from dist_train.config import DataConfig, LossConfig, OptimConfig, TrainConfig, load_config
from dist_train.data.transforms import build_batch_normalize, build_transform
from dist_train.errors import ConfigError
from dist_train.recipe.ema import WeightsEma, ema_decay_per_update
from dist_train.recipe.losses import build_loss
from dist_train.recipe.models import create_model, model_from_config
from dist_train.recipe.optim import build_optimizer
from dist_train.training.state import _OptimizerState
from dist_train.training.tracking import read_metrics

BILINEAR, BICUBIC = v2.InterpolationMode.BILINEAR, v2.InterpolationMode.BICUBIC


def photos(count: int = 6) -> list[Image.Image]:
    """RGB images of ImageNet-like shapes (landscape and portrait), random pixels."""
    rng = np.random.default_rng(1)
    return [Image.fromarray(rng.integers(0, 256, (300 + 17 * i, 260 - 9 * i, 3), dtype=np.uint8))
            for i in range(count)]


def test_torchvisions_v2_recipe_crops_176_and_evaluates_232_then_224():
    """torchvision's ClassificationPresetTrain / ClassificationPresetEval with --train-crop-size
    176 --val-resize-size 232 --val-crop-size 224 --auto-augment ta_wide --random-erase 0.1,
    built from v2 primitives, draw for draw from the same seed."""
    cfg = DataConfig(image_size=176, val_resize_size=232, val_crop_size=224, augment="trivialaugment",
                     random_erasing=0.1, mean=[0.5] * 3)
    train = v2.Compose([v2.RandomResizedCrop(176, interpolation=BILINEAR, antialias=True), v2.RandomHorizontalFlip(),
                        v2.TrivialAugmentWide(interpolation=BILINEAR), v2.ToImage(),
                        v2.RandomErasing(p=0.1, value=[128] * 3)])
    evaluation = v2.Compose([v2.Resize(232, interpolation=BILINEAR, antialias=True), v2.CenterCrop(224), v2.ToImage()])
    ours_train, ours_eval = build_transform(cfg, train=True), build_transform(cfg, train=False)
    for i, image in enumerate(photos()):
        torch.manual_seed(i)
        expected = train(image)
        torch.manual_seed(i)
        got = ours_train(image)
        assert got.shape == (3, 176, 176) and torch.equal(got, expected)
        assert torch.equal(ours_eval(image), evaluation(image)) and ours_eval(image).shape == (3, 224, 224)


def test_timms_crop_pct_095_at_224_bicubic_evaluates_as_timms_own_transform():
    """timm's eval transform (resize floor(224 / 0.95) = 235, bicubic, center crop 224), and
    its normalization, against dist-train's on the same images."""
    from timm.data import create_transform

    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    cfg = DataConfig(image_size=160, val_crop_size=224, crop_pct=0.95, interpolation="bicubic", mean=mean, std=std)
    theirs = create_transform(224, is_training=False, crop_pct=0.95, interpolation="bicubic", mean=mean, std=std)
    ours, normalize = build_transform(cfg, train=False), build_batch_normalize(cfg)
    assert [type(t) for t in ours.transforms] == [v2.Resize, v2.CenterCrop, v2.ToImage]
    assert ours.transforms[0].size == [235] and ours.transforms[0].interpolation == BICUBIC
    for image in photos():
        expected = theirs(image)
        got = normalize(ours(image)[None])[0]
        assert got.shape == expected.shape == (3, 224, 224)
        assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("threshold", [None, 0.2])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("mixed", [False, True])
def test_bce_on_single_label_data_equals_timms_binary_cross_entropy(threshold, smoothing, mixed):
    from timm.data.mixup import mixup_target
    from timm.loss import BinaryCrossEntropy

    torch.manual_seed(0)
    logits = torch.randn(12, 7, dtype=torch.float32) * 3
    labels = torch.randint(0, 7, (12,))
    ours = build_loss(LossConfig(name="bce", label_smoothing=smoothing, bce_target_threshold=threshold), 7)
    if mixed:  # torchvision's MixUp blends one-hot targets; timm's Mixup smooths the blend itself
        lam = 0.7
        paired = labels.flip(0)  # timm pairs image i with image n-1-i
        soft = F.one_hot(labels, 7).float() * lam + F.one_hot(paired, 7).float() * (1 - lam)
        theirs_target = mixup_target(labels, 7, lam=lam, smoothing=smoothing)
        expected = BinaryCrossEntropy(smoothing=0.0, target_threshold=threshold)(logits, theirs_target)
        assert torch.allclose(ours(logits, soft), expected, atol=1e-6)
    else:
        expected = BinaryCrossEntropy(smoothing=smoothing, target_threshold=threshold)(logits, labels)
        assert torch.allclose(ours(logits, labels), expected, atol=1e-6)


def test_bce_with_a_multiclass_task_is_a_valid_config_and_threshold_needs_it():
    cfg = load_config(None, ["loss.name=bce", "loss.bce_target_threshold=0.2", "data.mixup_alpha=0.1"])
    assert cfg.data.task == "multiclass"
    with pytest.raises(ConfigError, match=r"bce_target_threshold is for loss\.name=bce"):
        load_config(None, ["loss.bce_target_threshold=0.2"])


def digit_batches(count: int = 30, batch: int = 32):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 - 0.3
    labels = torch.tensor(y)
    return [(images[i * batch:(i + 1) * batch], labels[i * batch:(i + 1) * batch]) for i in range(count)]


def param_table(model, optimizer) -> dict[str, tuple[float, float]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["weight_decay"], round(g.get("lr_scale", 1.0), 12))
            for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("name", ["lamb", "lars", "lion", "adopt", "nadamw"])
def test_timms_optimizers_train_digits_with_timms_parameter_groups_and_resume_their_state(name):
    from timm.optim import create_optimizer_v2

    # The groups: no decay on 1-d parameters and the ViT's own no_weight_decay() (pos_embed,
    # cls_token), layer decay by timm's group_matcher, exactly as timm's factory groups them.
    vit = create_model("timm/vit_tiny_patch16_224", 10, 1,
                       {"img_size": 8, "patch_size": 2, "embed_dim": 32, "depth": 2, "num_heads": 2})
    cfg = OptimConfig(name=name, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    ours = build_optimizer(vit, cfg)
    theirs = create_optimizer_v2(vit, opt=name, lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    assert type(ours) is type(theirs) and type(ours).__module__.startswith("timm.optim")
    assert param_table(vit, ours) == param_table(vit, theirs)
    assert param_table(vit, ours)["pos_embed"] == (0.0, 0.75 ** 3)  # exempt from decay, layer 0 of 4

    torch.manual_seed(0)
    model = create_model("small_cnn_gn", 10, 1)
    optimizer = build_optimizer(model, OptimConfig(name=name, lr=0.01 if name != "lion" else 1e-3, weight_decay=1e-4))
    losses = []
    batches = digit_batches()
    for images, labels in batches[:20]:
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and np.mean(losses[-5:]) < np.mean(losses[:5])

    # Its state as the checkpoint keeps it (tensors + JSON), loaded into a fresh optimizer:
    # the next steps are bitwise those of the optimizer never saved.
    flat = _OptimizerState(optimizer).state_dict()
    assert all(isinstance(v, torch.Tensor) for k, v in flat.items() if k not in ("param_groups", "scalars"))
    json.dumps([flat["param_groups"], flat["scalars"]])  # the rest is JSON (timm LAMB's group step a tensor)
    flat = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in flat.items()}  # as read from disk
    twin = create_model("small_cnn_gn", 10, 1)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = build_optimizer(twin, OptimConfig(name=name, lr=0.01 if name != "lion" else 1e-3,
                                                       weight_decay=1e-4))
    _OptimizerState(twin_optimizer).load_state_dict(flat)
    for m, opt in ((model, optimizer), (twin, twin_optimizer)):
        for images, labels in batches[20:]:
            F.cross_entropy(m(images), labels).backward()
            opt.step()
            opt.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True))


def test_an_unknown_optimizer_is_one_line_naming_timms_list():
    with pytest.raises(ConfigError, match=r"optim\.name: 'lambb' is neither sgd, adamw nor one of timm's"):
        build_optimizer(create_model("small_cnn", 10, 1), OptimConfig(name="lambb"))


def test_model_kwargs_reach_timm_and_torchvision_and_a_wrong_one_is_named():
    vit = create_model("timm/vit_tiny_patch16_224", 10, 3, {"drop_path_rate": 0.1, "img_size": 32})
    assert vit.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)
    convnext = create_model("convnext_tiny", 10, 3, {"stochastic_depth_prob": 0.2})
    assert max(m.p for m in convnext.modules() if type(m).__name__ == "StochasticDepth") == pytest.approx(0.2)
    with pytest.raises(ConfigError, match=r"model\.kwargs .*do not fit resnet18"):
        create_model("resnet18", 10, 3, {"stochastic_depth_prob": 0.2})
    with pytest.raises(ConfigError, match=r"model\.kwargs .*do not fit small_cnn"):
        create_model("small_cnn", 10, 1, {"drop_rate": 0.1})
    assert create_model("small_cnn", 10, 1, {"width": 8}).head.in_features == 16
    with pytest.raises(ConfigError, match="width of small_cnn_gn must be a multiple of 8"):
        create_model("small_cnn_gn", 10, 1, {"width": 12})
    with pytest.raises(ConfigError, match=r"model\.kwargs\.checkpoint_path is set by dist-train"):
        load_config(None, ["model.kwargs={checkpoint_path: /tmp/x.pth}"])


@pytest.mark.parametrize(("name", "kwargs", "size", "batch", "saved_at_most"), [
    ("timm/vit_tiny_patch16_224", {"img_size": 64, "depth": 4}, 64, 32, 0.5),  # timm's own
    ("timm/resnet18", {}, 64, 8, 0.6),
    ("resnet18", {}, 64, 8, 0.6),  # torchvision's: torch's checkpoint wrapper around layer1..layer4
    ("mobilenet_v3_small", {}, 64, 8, 0.6),  # torchvision's: around each block of its features
])
def test_grad_checkpointing_gives_the_same_gradients_with_less_activation_memory(name, kwargs, size, batch,
                                                                                 saved_at_most):
    from dist_train.config import ModelConfig

    torch.manual_seed(0)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    grads, peaks = {}, {}
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = model_from_config(ModelConfig(name=name, kwargs=kwargs, grad_checkpointing=checkpointing), 10, 3)
        model.train()
        saved = [0]

        def pack(tensor, saved=saved):  # the bytes autograd keeps for the backward pass
            saved[0] += tensor.numel() * tensor.element_size()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        # torch's wrapper names its module in the parameters' names (not in the state dict's)
        grads[checkpointing] = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone()
                                for n, p in model.named_parameters()}
        peaks[checkpointing] = saved[0]
    for n, g in grads[False].items():
        assert torch.allclose(grads[True][n], g, atol=1e-6, rtol=1e-5), n
    print(f"{name}: activations saved for backward {peaks[False] / 2**20:.1f} MiB without, "
          f"{peaks[True] / 2**20:.1f} MiB with grad checkpointing")
    assert peaks[True] <= saved_at_most * peaks[False]
    state = model.state_dict()  # the wrapper leaves the checkpoint's names as they were
    assert set(state) == set(model_from_config(ModelConfig(name=name, kwargs=kwargs), 10, 3).state_dict())


def test_grad_checkpointing_of_a_model_without_blocks_is_one_line():
    from dist_train.recipe.models import enable_grad_checkpointing

    with pytest.raises(ConfigError, match=r"model\.grad_checkpointing: plain has no repeated blocks to checkpoint"):
        enable_grad_checkpointing(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2)), "plain")


def test_ema_every_n_steps_and_torchvisions_decay_adjustment():
    # torchvision's reference: --model-ema-decay 0.99998 --model-ema-steps 32, 8 x 128, 600 epochs.
    cfg = TrainConfig(ema_decay=0.99998, ema_every_steps=32, ema_adjust="torchvision", epochs=600)
    assert ema_decay_per_update(cfg, 1024) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    assert ema_decay_per_update(TrainConfig(ema_decay=0.999), 1024) == 0.999

    model = create_model("small_cnn", 10, 1)
    ema = WeightsEma(model, decay=0.5, every_steps=4)
    assert [step for step in range(1, 13) if ema.due(step)] == [4, 8, 12]


def test_dropout_masks_depend_on_the_micro_batch_not_the_process():
    """1 process x 2 micro-batches draws the masks 2 processes x 1 draw (runtime/seeds.py)."""
    from dist_train.runtime.seeds import ForwardSeeds

    def masks(rank: int, accum: int, micro: int) -> torch.Tensor:
        ForwardSeeds(seed=3, rank=rank, grad_accum_steps=accum, device=torch.device("cpu")).at_step(7)(micro)
        return F.dropout(torch.ones(64), p=0.5, training=True)

    assert torch.equal(masks(rank=0, accum=2, micro=1), masks(rank=1, accum=1, micro=0))
    assert not torch.equal(masks(rank=0, accum=2, micro=0), masks(rank=0, accum=2, micro=1))


def test_the_average_copies_the_weights_until_the_warmup_is_over():
    """torchvision's reference resets its average after every update of a warmup epoch: the
    update after the last one in warmup still copies; the next averages."""
    ema = WeightsEma(create_model("small_cnn", 10, 1), decay=0.9, every_steps=4, copy_through_step=10)
    assert [ema.decay_at(u) for u in range(1, 6)] == [0.0, 0.0, 0.0, 0.9, 0.9]  # steps 4, 8 in warmup; 12 copies


@pytest.fixture(scope="module")
def photos_224(tmp_path_factory):
    """Synthetic 224 px RGB shards: 16 training images (2 steps of 8), 4 validation."""
    from .conftest import run_cli

    out = tmp_path_factory.mktemp("photos") / "shards"
    result = run_cli("make-shards", "--source", "synthetic", "--out", str(out), "--num-samples", "20",
                     "--num-classes", "10", "--image-size", "224", "--val-fraction", "0.2", "--shard-size", "8")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("config", "extra"), [
    ("imagenet_resnet50", ()), ("imagenet_resnet50_rsb_a3", ()), ("imagenet_deit_small", ()),
    # FFCV's ramp within the one epoch: step 0 at 160 px, step 1 at 192.
    ("imagenet_resnet50_fast", ("data.progressive_start_epoch=0.25", "data.progressive_end_epoch=0.75")),
])
def test_the_published_recipes_load_and_train_two_steps_on_the_cpu(config, extra, photos_224, tmp_path):
    """Each recipe as shipped, with only the data, the batch (8: its repeats still fit), a
    warmup that fits one epoch and the CPU's execution settings overridden."""
    from .conftest import REPO, run_cli

    out = tmp_path / "run"
    result = run_cli("train", "--config", str(REPO / "configs" / f"{config}.yaml"), f"data.train={photos_224}",
                     f"data.val={photos_224}", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16",
                     "train.epochs=1", "sched.warmup_epochs=0.5", "train.mixed_precision=no",
                     "model.channels_last=false", "train.log_every_steps=1",
                     f"train.output_dir={out}", "tracking.wandb=false", "tracking.plots=false",
                     "train.progress_bar=false", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 steps per epoch of 8 images" in result.stdout
    meta = json.loads((out / "last" / "meta.json").read_text())
    assert meta["step"] == 2 and math.isfinite(meta["metrics"]["val/loss"]) and "val/acc_top5" in meta["metrics"]
    if extra:
        sizes = [r["train/image_size"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
        assert sizes == [160, 192]


def ffcv_resolution(epoch: int, min_res=160, max_res=192, start_ramp=17, end_ramp=20) -> int:
    """FFCV's ImageNetTrainer.get_resolution (train_imagenet.py), with rn50_24_epochs.yaml's values."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    return int(np.round(np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])[0] / 32)) * 32


def ffcv_lr(epoch: float, lr=1.7, epochs=24, lr_peak_epoch=2) -> float:
    """FFCV's get_cyclic_lr, which its train loop interpolates per iteration."""
    return float(np.interp([epoch], [0, lr_peak_epoch, epochs], [1e-4 * lr, lr, 0])[0])


def test_the_fast_recipe_ramps_its_size_and_lr_at_ffcvs_steps_and_evaluates_as_ffcv():
    """configs/imagenet_resnet50_fast.yaml on 8 GPUs x 512: every step's crop is FFCV's size of
    its epoch, every step's LR FFCV's per-iteration one; evaluation 292 -> 256 px with flips."""
    from dist_train.data.resolution import resolution_schedule
    from dist_train.data.transforms import eval_geometry
    from dist_train.recipe.optim import lr_factor_fn

    from .conftest import REPO

    cfg = load_config(REPO / "configs" / "imagenet_resnet50_fast.yaml")
    steps = 1_281_167 // (8 * cfg.data.batch_size)  # ImageNet's training set, a global batch of 4096
    schedule = resolution_schedule(cfg.data, cfg.train.epochs)
    for epoch in range(cfg.train.epochs):
        assert {schedule.size_at(epoch, s, steps) for s in range(steps)} == {ffcv_resolution(epoch)}, epoch
    factor = lr_factor_fn(cfg.sched, steps, cfg.train.epochs, base_lr=cfg.optim.lr)
    for t in range(0, steps * cfg.train.epochs, 97):
        assert cfg.optim.lr * factor(t) == pytest.approx(ffcv_lr(t / steps), rel=1e-9, abs=1e-12), t
    assert cfg.optim.lr_base_batch == 8 * cfg.data.batch_size
    geometry = eval_geometry(cfg.data)
    assert (geometry.resize, geometry.crop, cfg.data.tta) == (292, 256, "flip")
