"""Knowledge distillation (recipe/distill.py): the loss is the formula (and timm's), the teacher
never trains, fits the student or is refused in one line, and a resume refuses a changed one.
Under 2-process DDP with accumulation (one all-reduce per step, W x K x b): test_distributed.py;
SIGKILL and resume bitwise with a teacher: test_resume.py's recipe."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dist_train.checkpoint import sha256_file
from dist_train.config import DistillConfig, load_config
from dist_train.errors import CheckpointError, ConfigError
from dist_train.recipe.distill import Teacher, TeacherIdentity, distillation_loss, load_teacher
from dist_train.recipe.models import create_model
from dist_train.training.engine import fit, train_step

from .conftest import DIGITS_CONFIG, REPO

DISTILL_CONFIG = REPO / "configs" / "digits_distill_cpu.yaml"

NO_AUTOCAST = SimpleNamespace(autocast=contextlib.nullcontext)


def by_hand(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """T^2 x the mean over the batch of sum_c p_c (log p_c - log q_c), p the teacher's softmax at T."""
    p, log_q = torch.softmax(teacher / t, -1), torch.log_softmax(student / t, -1)
    return t * t * (p * (p.log() - log_q)).sum(-1).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_the_distillation_loss_is_the_formula(temperature):
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(16, 10, generator=gen) * 3, torch.randn(16, 10, generator=gen) * 3
    assert torch.allclose(distillation_loss(student, teacher, temperature), by_hand(student, teacher, temperature),
                          rtol=1e-5, atol=1e-6)
    assert distillation_loss(teacher, teacher, temperature).abs() < 1e-6  # the teacher matched: nothing to learn


def test_the_blended_loss_is_timms_logit_distillation():
    """timm's LogitDistillationTask with task_loss_weight = 1 - alpha: the same loss, the same gradient."""
    pytest.importorskip("timm.task.distillation")
    import timm
    from timm.task.distillation import LogitDistillationTask

    torch.manual_seed(0)
    student = timm.create_model("test_resnet", num_classes=10, pretrained=False)
    teacher_model = timm.create_model("test_resnet", num_classes=10, pretrained=False).eval()
    images, labels = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    alpha, temperature = 0.3, 3.0
    theirs = LogitDistillationTask(student, teacher_model, criterion=torch.nn.CrossEntropyLoss(),
                                   task_loss_weight=1 - alpha, temperature=temperature, verbose=False)
    theirs.train()
    expected = theirs(images, labels)["loss"]
    teacher = Teacher(teacher_model, DistillConfig(teacher="t", alpha=alpha, temperature=temperature),
                      TeacherIdentity("t", "", ""))
    student.train()
    outputs = student(images)
    ours = teacher.loss(F.cross_entropy(outputs, labels), outputs, images, NO_AUTOCAST)
    assert torch.allclose(ours, expected, rtol=1e-5)


def test_training_leaves_the_teacher_bitwise_as_it_was():
    """Its weights and batch-norm statistics do not move, it holds no gradient; the student does train."""
    torch.manual_seed(0)
    teacher = Teacher(create_model("small_cnn", 5, 1), DistillConfig(teacher="t", alpha=0.5, temperature=2.0),
                      TeacherIdentity("t", "", ""))
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    student = create_model("small_cnn_gn", 5, 1)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    accelerator = SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext,
                                  accumulate=lambda model: contextlib.nullcontext(), sync_gradients=True,
                                  backward=lambda loss: loss.backward())
    progress = SimpleNamespace(batch_done=lambda loss, n: None)
    batches = [(torch.randn(8, 1, 12, 12), torch.randint(0, 5, (8,))) for _ in range(3)]
    for images, labels in batches:
        train_step(student, [(images, labels)], torch.nn.CrossEntropyLoss(), optimizer, accelerator, progress,
                   teacher=teacher)
    after = teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())


def test_a_teacher_trained_with_other_statistics_sees_its_own_normalization(tmp_path):
    """Student pixels normalized by (0.25, 0.35), the teacher's checkpoint by (0.5, 0.2): it is
    given (x - 0.5) / 0.2 of the same raw pixels x."""
    teacher_dir = write_teacher_checkpoint(tmp_path, mean=[0.5], std=[0.2])
    cfg = load_config(DIGITS_CONFIG, [f"distill.teacher={teacher_dir}"])

    teacher = load_teacher(cfg, 10)
    raw = torch.rand(4, 1, 16, 16)
    theirs = teacher.model((raw - 0.5) / 0.2)
    assert torch.allclose(teacher.logits((raw - 0.25) / 0.35, NO_AUTOCAST), theirs, atol=1e-5)


def write_teacher_checkpoint(directory: Path, mean=(0.25,), std=(0.35,), classes: int = 10) -> Path:
    """A dist-train model checkpoint of a seeded small CNN, as `train` writes RUN/best."""
    from dist_train.checkpoint import save_model_checkpoint
    from dist_train.config import to_dict

    cfg = load_config(DIGITS_CONFIG, [f"data.mean={list(mean)}", f"data.std={list(std)}"])
    torch.manual_seed(3)
    model = create_model(cfg.model.name, classes, cfg.data.channels)
    return save_model_checkpoint(directory / "teacher", model.state_dict(),
                                 {"config": to_dict(cfg), "num_classes": classes})


@pytest.mark.parametrize(("overrides", "message"), [
    (["distill.teacher_weights=w.pth"], "distill.teacher_weights and distill.teacher_kwargs are the teacher's"),
    (["distill.teacher=x", "distill.alpha=0"], "distill.alpha must be in (0, 1]"),
    (["distill.teacher=x", "distill.temperature=0"], "distill.temperature must be in (0, 100]"),
    (["distill.teacher=x", "distill.teacher_kwargs={drop_rate: 0.1}"], "distill.teacher_kwargs are a named teacher's"),
    (["distill.teacher=x", "distill.teacher_weights=w", "distill.teacher_kwargs={checkpoint_path: a}"],
     "distill.teacher_kwargs.checkpoint_path is set by dist-train from distill.teacher_weights"),
    (["distill.teacher=x", "data.task=multilabel", "loss.name=bce"], "is for data.task=multiclass"),
])
def test_bad_distillation_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(DIGITS_CONFIG, overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_teacher_that_does_not_fit_is_refused_in_one_line(tmp_path):
    from dist_train.recipe.distill import teacher_identity

    def refusal(*overrides: str, classes: int = 10) -> str:
        cfg = load_config(DIGITS_CONFIG, list(overrides))
        with pytest.raises((ConfigError, CheckpointError)) as caught:
            load_teacher(cfg, classes)
        assert "\n" not in str(caught.value)
        return str(caught.value)

    teacher_dir = write_teacher_checkpoint(tmp_path)
    assert "predicts 10 classes, the student 5" in refusal(f"distill.teacher={teacher_dir}", classes=5)
    assert "takes 1-channel images" in refusal(f"distill.teacher={teacher_dir}", "data.channels=3",
                                              "data.mean=[0.5]", "data.std=[0.5]")
    with pytest.raises(CheckpointError, match="is not a dist-train model checkpoint"):
        teacher_identity(DistillConfig(teacher=str(tmp_path / "nowhere")))
    headless = tmp_path / "headless.safetensors"
    weights = load_file(str(teacher_dir / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("head.")}, str(headless))
    assert "lacks head.weight" in refusal("distill.teacher=small_cnn", f"distill.teacher_weights={headless}")


def test_a_resume_refuses_a_teacher_whose_weights_changed(digits_dir, tmp_path):
    """The shipped example (configs/digits_distill_cpu.yaml) with a named teacher: recorded in
    meta.json and summary.md; a resume after its file changed is refused in one line, before
    the run directory changes (the same file unchanged resumes bitwise: test_resume.py)."""
    teacher = tmp_path / "teacher.safetensors"
    weights = load_file(str(write_teacher_checkpoint(tmp_path) / "model.safetensors"))
    save_file(weights, str(teacher))
    out = tmp_path / "run"
    overrides = [f"data.train={digits_dir}", f"data.val={digits_dir}", f"train.output_dir={out}", "train.epochs=1",
                 "data.num_workers=0", "tracking.wandb=false", "train.progress_bar=false",
                 "distill.teacher=small_cnn", f"distill.teacher_weights={teacher}"]
    fit(load_config(DISTILL_CONFIG, overrides))
    meta = json.loads((out / "best" / "meta.json").read_text())
    assert meta["distill"] == {"source": "small_cnn", "weights": str(teacher.resolve()),
                               "sha256": sha256_file(teacher), "alpha": 0.5, "temperature": 4.0}
    assert meta["config"]["model"]["kwargs"] == {"width": 8}  # the student is the small one
    assert f"distilled from small_cnn (sha256 {sha256_file(teacher)[:12]}...)" in (out / "summary.md").read_text()
    records = (out / "metrics.jsonl").read_text()
    weights["head.bias"] = weights["head.bias"] + 1e-3  # retrained, or another file under the same name
    save_file(weights, str(teacher))
    resume = [*overrides[:3], "train.epochs=2", *overrides[4:], "train.resume=auto"]
    with pytest.raises(ConfigError) as caught:
        fit(load_config(DISTILL_CONFIG, resume))
    assert str(caught.value).startswith(f"distill.teacher: {teacher.resolve()} changed since ")
    assert "\n" not in str(caught.value) and (out / "metrics.jsonl").read_text() == records
