"""Config fuzzing: whatever YAML and overrides a user writes, the answer is a valid config or a
one-line ConfigError (exit 2 on the command line), never a traceback.

Trees are drawn around the real schema (real section and key names, often with values of the
wrong type, out of range, nested or null), plus raw text as YAML and free-form overrides.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import typing
from pathlib import Path

import pytest
import torch
import yaml
from accelerate.utils import set_seed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dist_train.cli import main
from dist_train.config import Config, config_from_dict, load_config, to_dict
from dist_train.data.order import OrderSpec
from dist_train.data.transforms import build_batch_normalize
from dist_train.errors import ConfigError, TrainingDiverged
from dist_train.recipe.losses import build_loss
from dist_train.recipe.models import create_model
from dist_train.recipe.optim import Schedule, build_optimizer
from dist_train.runtime.preemption import release_stop_signals
from dist_train.training.progress import _finite

from .conftest import DIGITS_CONFIG

_DEFAULTS = Config()
SECTIONS = {section.name: [key.name for key in dataclasses.fields(getattr(_DEFAULTS, section.name))]
            for section in dataclasses.fields(Config)}
KEYS = [f"{section}.{key}" for section, keys in SECTIONS.items() for key in keys]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.integers(),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["auto", "bf16", "fp16", "no", "cosine", "plateau", "focal", "sgd", "adamw",
                     "val/acc", "small_cnn", "resnet18", "data/digits", "1e-3", "-1", "0", "[1,2]"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
key_names = st.one_of(st.sampled_from(sorted({k for keys in SECTIONS.values() for k in keys})), st.text(max_size=8))
sections = st.dictionaries(key_names, values, max_size=5)
trees = st.dictionaries(st.one_of(st.sampled_from(sorted(SECTIONS)), st.text(max_size=8)),
                        st.one_of(sections, values), max_size=4)
overrides = st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), st.text(max_size=16)),
    st.builds(lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}",
              st.sampled_from(KEYS), values),
    st.text(max_size=24),
), max_size=4)
documents = st.one_of(trees.map(lambda t: yaml.safe_dump(t, allow_unicode=True)), st.text(max_size=200))


def _valid_or_one_line_error(text: str, items: list[str]) -> Config | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            return load_config(path, items)
        except ConfigError as exc:
            message = str(exc)
            assert message and "\n" not in message, message
            return None


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents, overrides)
def test_any_yaml_and_overrides_give_a_config_or_a_one_line_error(text, items):
    cfg = _valid_or_one_line_error(text, items)
    if cfg is not None:  # what was accepted is a config that survives its own round trip
        again = config_from_dict(to_dict(cfg))
        assert _same(to_dict(again), to_dict(cfg))


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
# An item that starts with "-" is an option, not an override: argparse answers it (usage, exit 2).
@given(overrides.filter(lambda items: any("=" in i for i in items) and not any(i.startswith("-") for i in items)))
def test_the_command_line_answers_exit_2_with_one_line(capsys, items):
    """Through `dist-train train`: bad overrides end with exit 2 and one line on stderr.

    A config that is valid goes on to look for its data in a directory that does not exist,
    a one-line exit 2 as well: training itself never starts here."""
    missing = "/nonexistent/dist-train-fuzz"
    try:
        code = main(["train", *items, f"data.train={missing}", f"data.val={missing}"])
    finally:
        release_stop_signals()  # `train` takes over SIGTERM; give it back to pytest
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("dist-train: error: ")


# --- every numeric key, with the numbers an attacker (or a typo) would give it ------------------

def _numeric_keys() -> list[tuple[str, bool]]:
    """(dotted key, takes a list) for every int and float setting of the schema."""
    found = []
    for section in dataclasses.fields(Config):
        hints = typing.get_type_hints(type(getattr(_DEFAULTS, section.name)))
        for name, tp in hints.items():
            args = set(typing.get_args(tp)) | {tp}
            is_list = any(typing.get_origin(a) is list for a in args)
            inner = {b for a in args for b in (typing.get_args(a) if typing.get_origin(a) is list else (a,))}
            if inner & {int, float}:
                found.append((f"{section.name}.{name}", is_list))
    return found


NUMERIC_KEYS = _numeric_keys()
HOSTILE_NUMBERS = [".nan", ".inf", "-.inf", "nan", "-1", "0", "1e-320", "1e308", "-1e308",
                   str(2**63), str(-(2**63)), str(10**30)]


def test_the_numeric_keys_are_all_found():
    keys = {k for k, _ in NUMERIC_KEYS}
    assert {"optim.lr", "optim.betas", "data.std", "sched.warmup_epochs", "train.clip_grad_norm", "train.seed",
            "data.num_workers", "loss.focal_alpha", "optim.lr_base_batch"} <= keys and len(keys) >= 30


@pytest.mark.parametrize("key, is_list", NUMERIC_KEYS, ids=[k for k, _ in NUMERIC_KEYS])
def test_non_finite_and_out_of_range_numbers_are_refused_or_train_finitely(key, is_list):
    """Each hostile number in each numeric key: a one-line ConfigError, or a config whose first
    optimizer steps (model, optimizer, schedule, loss, normalization and seeding built from it,
    as a run builds them) give finite losses and weights, or stop with TrainingDiverged."""
    for number in HOSTILE_NUMBERS:
        value = f"[{number}]" if is_list else number
        try:
            cfg = load_config(DIGITS_CONFIG, [f"{key}={value}"])
        except ConfigError as exc:
            assert "\n" not in str(exc) and len(str(exc)) < 300, str(exc)
            continue
        _first_steps_train_finitely(cfg, f"{key}={value}")


def _first_steps_train_finitely(cfg: Config, item: str) -> None:
    set_seed(cfg.train.seed)
    OrderSpec(seed=cfg.train.seed, global_batch=cfg.data.batch_size, partitions=1, window=cfg.data.shuffle_buffer)
    model = create_model(cfg.model.name, 10, cfg.data.channels)
    optimizer = build_optimizer(model, cfg.optim, global_batch=cfg.data.batch_size * cfg.train.grad_accum_steps)
    schedule = Schedule(optimizer, cfg.sched, steps_per_epoch=5, epochs=cfg.train.epochs)
    try:
        criterion = build_loss(cfg.loss, num_classes=10, task=cfg.data.task)
    except ConfigError as exc:  # checked against the dataset's classes: the run stops here, in one line
        assert "\n" not in str(exc) and len(str(exc)) < 300, str(exc)
        return
    normalize = build_batch_normalize(cfg.data)
    generator = torch.Generator().manual_seed(0)
    # 16 x 16 images, not data.image_size: the model pools globally, and a 16384-pixel side
    # (the largest allowed) would only make this test slow.
    images = normalize(torch.randint(0, 256, (8, cfg.data.channels, 16, 16), dtype=torch.uint8, generator=generator))
    labels = torch.randint(0, 10, (8,), generator=generator)
    assert math.isfinite(schedule.lr), item
    for _ in range(3):
        loss = criterion(model(images), labels)
        try:
            _finite(loss.detach(), "")
        except TrainingDiverged:
            return  # the run would stop here, in one line
        loss.backward()
        if cfg.train.clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        schedule.after_optimizer_step()
        assert math.isfinite(schedule.lr), item
