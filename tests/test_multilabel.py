"""Multi-label data: labels as `.cls` lists or `.json`, make-shards from a CSV file, the losses,
and bad labels (one line naming shard and key, exit 2; or counted and skipped). The metrics
against scikit-learn: test_metrics.py and, under 2-process DDP, test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from sklearn.datasets import load_digits

from dist_train.cli import main
from dist_train.config import load_config
from dist_train.data.datasets import resolve_datasets
from dist_train.data.labels import LabelReader
from dist_train.data.shard_writer import make_shards
from dist_train.data.sources import DIGIT_TAGS, csv_list, digit_tags, encode_png
from dist_train.errors import ConfigError, DataError
from dist_train.recipe.losses import AsymmetricLoss, MultilabelBCE, build_loss
from dist_train.runtime.preemption import release_stop_signals

from .conftest import REPO, run_cli

DIGITS = load_digits()
PIXELS = (DIGITS.images * 255 / 16).astype(np.uint8)
TAG_CONFIG = REPO / "configs" / "digit_tags_cpu.yaml"


def _tags(i: int) -> list[int]:
    return [t for t, members in enumerate(DIGIT_TAGS.values()) if DIGITS.target[i] in members]


def _write(path: Path, first: int, count: int, damage: dict[int, dict] | None = None) -> str:
    """`count` tagged digits from `first`, labels as `.cls` lists; `damage` replaces members."""
    with wds.TarWriter(str(path)) as sink:
        for i in range(first, first + count):
            sample = {"__key__": f"d{i:05d}", "png": PIXELS[i], "cls": ",".join(map(str, _tags(i)))}
            sample.update((damage or {}).get(i - first, {}))
            sink.write({k: v for k, v in sample.items() if v is not None})
    return str(path)


def test_label_reader_reads_lists_and_json_and_checks_them():
    reader = LabelReader(5, multilabel=True, allow_empty=True)
    assert reader.read(b"3,0, 3", "cls", "w") == (0, 3)
    assert reader.read(b"", "cls", "w") == ()
    assert reader.read(b"[4, 1]", "json", "w") == (1, 4)
    assert reader.read(b'{"labels": [2]}', "json", "w") == (2,)
    assert torch.equal(reader.target((1, 4)), torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0]))
    assert reader.member({"json": b"", "png": b""}) == "json" and reader.member({"png": b""}) is None
    for raw, member, problem in [(b"1,5", "cls", "label 5 is outside 0..4"), (b"1;2", "cls", "comma-separated"),
                                 (b"[1, true]", "json", "not a list of integers"), (b"{", "json", "not JSON")]:
        with pytest.raises(DataError, match=problem):
            reader.read(raw, member, "shard.tar: sample 'k'")
    with pytest.raises(DataError, match=r"an empty label list \(data.allow_empty_labels=false\)"):
        LabelReader(5, multilabel=True, allow_empty=False).read(b" ", "cls", "w")
    with pytest.raises(DataError, match=r"is a list: a multi-label sample, and data.task is multiclass"):
        LabelReader(5).read(b"1,2", "cls", "w")
    assert LabelReader(5).member({"json": b""}) is None  # one label per image: `.cls` only


@pytest.mark.parametrize(("raw", "multilabel", "problem"), [
    (b"+3", False, "not an integer"), (b"1_0", False, "not an integer"), (b"0_9", False, "not an integer"),
    ("\u00b3".encode(), False, "not an integer"), (b"1,+2", True, "comma-separated"),
    (b"1_0,2", True, "comma-separated"),
    # 65,537 bytes: refused whole, not cut to a prefix that parses ("0,0,...,0,1" of the 19 lost).
    (b"0," * 32768 + b"19", True, "longer than 65536 bytes"), (b"3" * 65537, False, "longer than 65536 bytes"),
    (b"0,1,2,3,4,0", True, "6 labels, more than data.num_classes=5"),
    (b"[" * 30000 + b"]" * 30000, True, r"not JSON \(or nested too deep\)"),
])
def test_a_label_is_decimal_digits_within_limits_or_refused(raw, multilabel, problem):
    """What int() would take (+3, 1_0, a superscript) or a cut prefix would make of it."""
    member = "json" if raw.startswith(b"[") else "cls"
    with pytest.raises(DataError, match=problem):
        LabelReader(5 if multilabel else 20, multilabel=multilabel).read(raw, member, "shard.tar: sample 'k'")


def test_make_shards_from_a_csv_file(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    lines = ["path,labels"]
    for i in range(30):
        (images / f"{i}.png").write_bytes(encode_png(PIXELS[i]))
        lines.append(f"images/{i}.png," + ";".join(sorted(DIGIT_TAGS)[t] for t in _tags(i)))
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    source = csv_list(tmp_path / "list.csv", multilabel=True)
    assert source.class_names == sorted(DIGIT_TAGS) and source.multilabel
    manifest = make_shards(source, tmp_path / "shards", val_fraction=0.2, shard_size=10)
    assert manifest["task"] == "multilabel" and manifest["num_classes"] == 5
    counts = np.sum([manifest["splits"][s]["class_counts"] for s in ("train", "val")], axis=0)
    names = sorted(DIGIT_TAGS)
    assert counts.tolist() == [sum(DIGITS.target[i] in DIGIT_TAGS[n] for i in range(30)) for n in names]
    with pytest.raises(DataError, match=r"list.csv, line 2: 2 labels .* one per image \(or --multilabel\)"):
        csv_list(tmp_path / "list.csv")
    (tmp_path / "bad.csv").write_text("path,labels\nimages/missing.png,even\n")
    with pytest.raises(DataError, match=r"bad.csv, line 2: 'images/missing.png' is not an image file"):
        csv_list(tmp_path / "bad.csv", multilabel=True)


def test_a_csv_cannot_pack_a_file_it_should_not(tmp_path):
    """A `.png` symlink to a file outside the CSV's folder, a non-image named .png, a label
    with a control character or a superscript digit: one line each, nothing packed."""
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0\n")
    folder = tmp_path / "listed"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "ok.png").write_bytes(encode_png(PIXELS[0]))
    (folder / "images" / "leak.png").symlink_to(secret)
    (folder / "images" / "inside.png").symlink_to(folder / "images" / "ok.png")  # a link within: fine
    (folder / "images" / "text.png").write_text("not an image")

    def refusal(row: str) -> str:
        (folder / "list.csv").write_text(f"path,labels\nimages/ok.png,0\n{row}\n")
        with pytest.raises(DataError) as caught:
            csv_list(folder / "list.csv")
        return str(caught.value)

    assert refusal("images/leak.png,1").endswith(f"'images/leak.png' is a symlink to {secret}, outside {folder}")
    assert refusal("images/text.png,1").endswith("'images/text.png' is not a JPEG, PNG or WebP image")
    assert "holds a control character" in refusal('images/ok.png,"a\x00b"')
    (folder / "list.csv").write_text("path,labels\nimages/ok.png,2\nimages/inside.png,\u00b2\n")
    assert csv_list(folder / "list.csv").class_names == ["2", "\u00b2"]  # two names, no int() of "²"


def test_digit_tags_give_every_digit_a_tag():
    source = digit_tags()
    assert len(source.samples) == 1797 and all(1 <= len(s.label) <= 3 for s in source.samples)


def test_asymmetric_loss_follows_its_formula_and_is_bce_without_focusing():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=generator) * 3
    target = (torch.rand(16, 5, generator=generator) < 0.3).float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / 16
    assert torch.allclose(MultilabelBCE()(logits, target), bce)
    assert torch.allclose(AsymmetricLoss(0.0, 0.0, 0.0)(logits, target), bce, atol=1e-6)
    p = logits.sigmoid().double()
    p_m = (p - 0.05).clamp(min=0)
    expected = -(target * (1 - p) ** 1 * p.log() + (1 - target) * p_m ** 4 * (1 - p_m).log()).sum(1).mean()
    assert torch.allclose(AsymmetricLoss(4.0, 1.0, 0.05)(logits, target).double(), expected, atol=1e-6)
    huge = torch.tensor([[40.0, -40.0]])  # saturated: finite loss and gradient
    huge.requires_grad_(True)
    loss = AsymmetricLoss(4.0, 0.0, 0.0)(huge, torch.tensor([[0.0, 1.0]]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(huge.grad).all()
    assert isinstance(build_loss(load_config(TAG_CONFIG).loss), AsymmetricLoss)


@pytest.mark.parametrize("loss", [MultilabelBCE(), AsymmetricLoss(4.0, 1.0, 0.05)])
def test_multilabel_losses_accumulate_like_one_batch(loss):
    """A mean over samples: two micro-batches average to the whole batch (W x K x b)."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(12, 5, generator=generator) * 2
    target = (torch.rand(12, 5, generator=generator) < 0.3).float()
    assert torch.allclose((loss(logits[:6], target[:6]) + loss(logits[6:], target[6:])) / 2, loss(logits, target),
                          atol=1e-6)


def test_task_settings_are_checked():
    with pytest.raises(ConfigError, match=r"loss.name=cross_entropy does not fit data.task=multilabel"):
        load_config(TAG_CONFIG, ["loss.name=cross_entropy", "train.monitor=val/map_macro"])
    with pytest.raises(ConfigError, match=r"unknown metric 'val/acc' for data.task=multilabel"):
        load_config(TAG_CONFIG, ["train.monitor=val/acc"])
    with pytest.raises(ConfigError, match=r"data.mixup_alpha / data.cutmix_alpha are for data.task=multiclass"):
        load_config(TAG_CONFIG, ["data.mixup_alpha=0.2"])


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("multilabel")
    tagged = root / "tagged"
    make_shards(digit_tags(), tagged, shard_size=256)
    return {
        "good": _write(root / "good.tar", 0, 40),
        "out_of_range": _write(root / "label-9.tar", 40, 40, {7: {"cls": "1,9"}}),
        "empty": _write(root / "empty-list.tar", 80, 40, {3: {"cls": ""}}),
        "bad_json": _write(root / "bad-json.tar", 120, 40, {5: {"cls": None, "json": b"[2, \"x\"]"}}),
        "tagged_dataset": str(tagged),
    }


def _train(capsys, shards: list[str], *overrides: str) -> tuple[int, str]:
    """`dist-train train` in this process (no worker: the errors come at indexing)."""
    data = "[" + ",".join(shards) + "]"
    try:
        code = main(["train", "--config", str(TAG_CONFIG), f"data.train={data}", f"data.val={data}",
                     "data.num_classes=5", "data.num_workers=0", "tracking.wandb=false", *overrides])
    finally:
        release_stop_signals()
    return code, capsys.readouterr().err


@pytest.mark.parametrize(("kind", "overrides", "problem"), [
    ("out_of_range", (), "sample 'd00047': label 9 is outside 0..4 (data.num_classes)"),
    ("empty", ("data.allow_empty_labels=false",), "sample 'd00083': an empty label list"),
    ("bad_json", (), "sample 'd00125': .json label b'[2, \"x\"]' is not a list of integers"),
    ("good", ("data.task=multiclass", "loss.name=cross_entropy", "train.monitor=val/f1_macro"),
     "sample 'd00000': label b'0,2' is a list: a multi-label sample, and data.task is multiclass"),
])
def test_a_bad_label_stops_the_run_in_one_line_naming_shard_and_key(capsys, bad_shards, kind, overrides, problem):
    code, err = _train(capsys, [bad_shards["good"], bad_shards[kind]], *overrides)
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"dist-train: error: {bad_shards[kind]}: {problem}"), err


def test_a_multilabel_dataset_given_to_a_multiclass_run_is_refused(capsys, bad_shards):
    code, err = _train(capsys, [bad_shards["tagged_dataset"]], "data.task=multiclass", "loss.name=cross_entropy",
                       "train.monitor=val/f1_macro", "data.num_classes=0")
    assert code == 2 and err.count("\n") == 1, err
    assert "a multilabel dataset (its dataset.json says so), and data.task is multiclass" in err


def test_bad_labels_are_counted_and_skipped_with_on_error_skip(bad_shards, tmp_path):
    cfg = load_config(TAG_CONFIG, [f"data.train=[{bad_shards['good']},{bad_shards['out_of_range']}]",
                                   f"data.val={bad_shards['empty']}", "data.num_classes=5", "data.on_error=skip",
                                   "data.allow_empty_labels=false"])
    datasets = resolve_datasets(cfg.data)
    assert datasets.train.samples == 79 and datasets.val.samples == 39 and datasets.skipped_samples == 2
    problems = sorted(d.problem for d in datasets.damage)
    assert problems == ["sample 'd00047': label 9 is outside 0..4 (data.num_classes)",
                        "sample 'd00083': an empty label list (data.allow_empty_labels=false)"]
    out = tmp_path / "run"
    done = run_cli("train", "--config", str(TAG_CONFIG), f"data.train={cfg.data.train}", f"data.val={cfg.data.val}",
                   "data.num_classes=5", "data.on_error=skip", "data.allow_empty_labels=false", "train.epochs=1",
                   "data.batch_size=16", f"train.output_dir={out}", "tracking.wandb=false", "tracking.plots=false",
                   "train.progress_bar=false")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "skipped 2 damaged samples" in done.stdout
    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val/loss" in line][-1]
    assert record["data/skipped_samples"] == 2 and record["val/map_macro"] > 0
