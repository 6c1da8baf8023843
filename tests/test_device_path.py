"""The device path: on CUDA, batches cross to the GPU as uint8 (pinned, non-blocking) and are
normalized there. Checked on the CPU with the same code: uint8 batches moved, then normalized,
equal batches normalized, then moved, bitwise, through the real pipeline and through training
steps. (On a GPU machine: benchmarks/gpu_check.py; the test at the end runs where CUDA is.)"""

from __future__ import annotations

import copy

import pytest
import torch

from dist_train.config import DataConfig, TrainConfig
from dist_train.data.order import OrderSpec
from dist_train.data.pipeline import (
    EvalStreamSpec,
    TrainStreamSpec,
    device_stage,
    make_eval_loader,
    make_train_loader,
)
from dist_train.data.resolve import resolve_shards
from dist_train.data.transforms import build_batch_normalize
from dist_train.recipe.models import SmallCNN
from dist_train.runtime.accelerator import make_accelerator
from dist_train.training.engine import train_step
from dist_train.training.progress import TrainProgress

CFG = DataConfig(num_workers=0, image_size=8, channels=1, mean=[0.3], std=[0.3], augment="light")


def _train_batches(digits_dir, uint8: bool) -> list:
    shards = resolve_shards(str(digits_dir), "train", 10)
    spec = TrainStreamSpec(shards, OrderSpec(0, 32, 1, 100), epoch=0, num_classes=10, batch_size=32)
    return list(make_train_loader(spec, CFG, for_device_stage=uint8))[:6]


def test_device_stage_is_for_cuda_only():
    assert device_stage(CFG, torch.device("cpu")) is None
    assert device_stage(CFG, torch.device("cuda")) is not None  # built without a GPU


def test_uint8_batches_normalized_after_the_copy_equal_normalized_ones_bitwise(digits_dir):
    normalize = build_batch_normalize(CFG)
    floats, raw = _train_batches(digits_dir, uint8=False), _train_batches(digits_dir, uint8=True)
    for (x, y), (u, v) in zip(floats, raw, strict=True):
        assert u.dtype == torch.uint8 and x.dtype == torch.float32 and u.element_size() * 4 == x.element_size()
        assert torch.equal(normalize(u.to("cpu", non_blocking=True)), x) and torch.equal(v, y)
    shards = resolve_shards(str(digits_dir), "val", 10)
    spec = EvalStreamSpec(shards, batch_size=50, num_classes=10)
    staged = make_eval_loader(spec, CFG, for_device_stage=True)
    for (x, y), (u, v) in zip(make_eval_loader(spec, CFG), staged, strict=True):
        assert torch.equal(normalize(u), x) and torch.equal(v, y)


def test_training_on_uint8_batches_normalized_in_the_step_is_bitwise_the_same(digits_dir):
    accelerator = make_accelerator(TrainConfig(cpu=True))
    torch.manual_seed(0)
    first = SmallCNN(10, 1)
    second = copy.deepcopy(first)
    for model, batches, normalize in ((first, _train_batches(digits_dir, False), None),
                                      (second, _train_batches(digits_dir, True), build_batch_normalize(CFG))):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        progress = TrainProgress(accelerator, show_bar=False)
        progress.start_epoch(0, 3)
        micro_batches = iter(batches)
        for _ in range(3):  # 3 steps of 2 micro-batches
            train_step(model, [next(micro_batches), next(micro_batches)], torch.nn.CrossEntropyLoss(), optimizer,
                       accelerator, progress, device_stage=normalize)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                  strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_uint8_then_normalize_equals_normalize_then_copy(digits_dir):
    normalize = build_batch_normalize(CFG)
    for u, _ in _train_batches(digits_dir, uint8=True):
        on_gpu = normalize(u.pin_memory().to("cuda", non_blocking=True))
        assert torch.allclose(on_gpu.cpu(), normalize(u), atol=1e-6, rtol=0)
