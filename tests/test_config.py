from __future__ import annotations

import time

import pytest
import yaml

from dist_train.config import Config, config_from_dict, load_config, save_config, to_dict
from dist_train.errors import ConfigError

from .conftest import DIGITS_CONFIG, run_cli


def test_defaults_validate():
    assert isinstance(load_config(), Config)


def test_yaml_and_dotted_overrides():
    cfg = load_config(DIGITS_CONFIG, ["optim.lr=0.05", "train.epochs=3", "data.mean=[0.5]", "train.clip_grad_norm=1"])
    assert cfg.optim.lr == 0.05
    assert cfg.train.epochs == 3
    assert cfg.data.mean == [0.5]
    assert cfg.train.clip_grad_norm == 1.0 and isinstance(cfg.train.clip_grad_norm, float)
    assert cfg.model.name == "small_cnn"  # from the file


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DIGITS_CONFIG, ["train.mixed_precision=bf16"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert config_from_dict(to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optim.lrr=0.1"], "unknown config key: optim.lrr"),
        (["nonsense.key=1"], "unknown config key: nonsense"),
        (["train.epochs=three"], "train.epochs: expected int, got 'three'"),
        (["train.epochs=2.5"], "train.epochs: expected int"),
        (["train.epochs=true"], "train.epochs: expected int, got True"),
        (["optim.nesterov=1"], "optim.nesterov: expected bool"),
        (["data.channels=2"], "data.channels: 2 is not one of [1, 3]"),
        (["optim.name=Adam W"], "optim.name: 'Adam W' is not an optimizer name"),
        (["data.mean=0.5"], "data.mean: expected a list"),
        (["data.mean=[0.5, x]"], "data.mean[1]: expected float"),
        (["train.epochs=0"], "train.epochs must be in [1, 1,000,000], got 0"),
        (["train.monitor=val/f1"], "train.monitor: unknown metric 'val/f1'"),
        (["train.auroc=false", "train.monitor=val/auroc_macro"],
         "train.monitor=val/auroc_macro needs train.auroc=true"),
        (["train.auroc=false", "sched.name=plateau", "sched.warmup_epochs=0", "sched.plateau_monitor=val/auroc_macro"],
         "sched.plateau_monitor=val/auroc_macro needs train.auroc=true"),
        (["data.channels=3", "data.mean=[0.1, 0.2]"], "data.mean has 2 values"),
        (["optim=1"], "optim must be a mapping"),
        (["train.epochs"], "not of the form key.sub=value"),
        (["sched.name=plateau", "sched.warmup_epochs=1"], "warmup_epochs is supported with step, cosine and linear"),
    ],
)
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        load_config(DIGITS_CONFIG, overrides)
    assert message in str(info.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_config_yaml_in_repo_is_plain_yaml():
    tree = yaml.safe_load(DIGITS_CONFIG.read_text())
    assert set(tree) <= {"data", "model", "loss", "optim", "sched", "train"}


def test_cli_reports_config_errors_in_one_line_with_exit_2():
    result = run_cli("train", "--config", str(DIGITS_CONFIG), "optim.lrr=0.1")
    assert result.returncode == 2
    assert result.stderr.strip() == "dist-train: error: unknown config key: optim.lrr (did you mean optim.lr?)"


def test_every_shipped_config_is_valid():
    configs = sorted((DIGITS_CONFIG.parent).glob("*.yaml"))
    assert len(configs) >= 3
    for path in configs:
        load_config(path)


def test_a_key_given_twice_is_an_error_naming_it_and_its_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  epochs: 1\n  seed: 3\n  epochs: 1000\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: 'epochs' is given twice in one section \(lines 2 and 4\)"):
        load_config(path)
    path.write_text("train: {epochs: 1}\ndata: {}\ntrain: {seed: 2}\n")  # a whole section, too
    with pytest.raises(ConfigError, match=r"'train' is given twice in one section \(lines 1 and 3\)"):
        load_config(path)


def test_a_billion_laughs_file_is_refused_at_once_in_a_short_line(tmp_path):
    """Nested YAML anchors: nine levels of nine references expand to 9**9 values."""
    lines = ["data:", "  train:", '    - &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"    - &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    path = tmp_path / "laughs.yaml"
    path.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="expands to more than 100,000 values") as caught:
        load_config(path)
    assert time.perf_counter() - start < 5 and len(str(caught.value)) < 200
    # The same bomb in one section's value of the wrong type: the message quotes it, cut short.
    with pytest.raises(ConfigError, match=r"^train\.epochs: expected int, got \[") as caught:
        load_config(None, ["train.epochs=[" + ", ".join(["'lol'"] * 5000) + "]"])
    assert len(str(caught.value)) < 200


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr=.nan", "optim.lr must be a finite number, got nan"),
        ("optim.lr=.inf", "optim.lr must be a finite number, got inf"),
        ("train.clip_grad_norm=.nan", "train.clip_grad_norm must be a finite number, got nan"),
        ("data.std=[.nan]", "data.std must be a finite number, got nan"),
        ("sched.warmup_epochs=.inf", "sched.warmup_epochs must be a finite number, got inf"),
        ("optim.momentum=-1", r"optim.momentum must be in \[0, 1\), got -1.0"),
        ("optim.betas=[2.0, 0.999]", r"optim.betas\[0\] must be in \[0, 1\), got 2.0"),
        ("optim.weight_decay=-0.1", r"optim.weight_decay must be in \[0, 10\], got -0.1"),
        ("sched.gamma=0", r"sched.gamma must be in \(0, 1\], got 0.0"),
        ("optim.lr=1e308", r"optim.lr must be in \(0, 100\], got 1e\+308"),
        ("train.seed=-1", r"train.seed must be in \[0, 4294967295\], got -1"),
        ("sched.warmup_epochs=20", r"sched.warmup_epochs must be in \[0, train.epochs=15\], got 20.0"),
        ("optim.momentum=0", r"optim.momentum must be positive with optim.nesterov=true, got 0.0"),
        ("data.num_workers=100000", r"data.num_workers must be at most 256, got 100000"),
        ("train.clip_grad_norm=0", r"train.clip_grad_norm must be positive \(or null\), got 0.0"),
    ],
)
def test_numbers_that_would_train_on_nan_or_fail_late_are_refused(override, message):
    with pytest.raises(ConfigError, match=f"^{message}$"):
        load_config(DIGITS_CONFIG, [override])


def test_config_defaults_round_trip_and_the_resolved_config_is_a_valid_config(tmp_path):
    """`dist-train config --defaults` written out and given back as --config is the default
    tree; `dist-train config --config C overrides` is C with them, loadable as is."""
    from dist_train.config import Config, to_dict

    defaults = run_cli("config", "--defaults")
    assert defaults.returncode == 0, defaults.stderr
    (tmp_path / "defaults.yaml").write_text(defaults.stdout)
    assert to_dict(load_config(tmp_path / "defaults.yaml")) == to_dict(Config())
    resolved = run_cli("config", "--config", str(DIGITS_CONFIG), "optim.lr=0.05", "data.tta=flip")
    assert resolved.returncode == 0, resolved.stderr
    (tmp_path / "resolved.yaml").write_text(resolved.stdout)
    expected = to_dict(load_config(DIGITS_CONFIG, ["optim.lr=0.05", "data.tta=flip"]))
    assert to_dict(load_config(tmp_path / "resolved.yaml")) == expected
    wrong = run_cli("config", "--config", str(DIGITS_CONFIG), "trian.epochs=3")
    assert wrong.returncode == 2 and wrong.stderr.strip() == ("dist-train: error: unknown config key: trian "
                                                              "(did you mean train?)")


def test_every_key_is_in_the_docs_reference_and_the_help_with_its_type_default_and_comment():
    """docs/config.md holds the table `dist-train config --reference` prints, generated from
    config.py: a key added without its entry there fails here (regenerate the table with
    `dist-train config --reference`)."""
    import dataclasses

    from dist_train.commands.config_reference import config_keys, help_text, reference_table
    from dist_train.config import Config

    keys = config_keys()
    every = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config)
             for f in dataclasses.fields(getattr(Config(), s.name))}
    assert {k.key for k in keys} == every
    assert all(k.comment for k in keys), [k.key for k in keys if not k.comment]
    docs = (DIGITS_CONFIG.parent.parent / "docs" / "config.md").read_text()
    marker = "<!-- keys: start -->\n"
    start, end = docs.index(marker) + len(marker), docs.index("<!-- keys: end -->")
    assert docs[start:end] == reference_table(), "docs/config.md: regenerate with `dist-train config --reference`"
    shown = run_cli("train", "--help").stdout
    assert shown.count("\n  data.") == sum(k.startswith("data.") for k in every)
    assert help_text().split("\n")[1] in shown
    assert "  optim.lr (float, default 0.1)" in shown


def test_train_dry_run_checks_config_and_data_prints_the_layout_and_writes_nothing(digits_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli("train", "--config", str(DIGITS_CONFIG), "--dry-run", f"data.train={digits_dir}",
                     f"data.val={digits_dir}", f"train.output_dir={out}", "train.grad_accum_steps=2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (f"dry run: 1438 train / 359 val samples, 10 classes; 22 steps per epoch of 64 "
                                     f"images (1 process(es) x 2 accumulation x 32), 15 epochs, into {out}")
    assert not out.exists()
    missing = run_cli("train", "--config", str(DIGITS_CONFIG), "--dry-run", f"data.train={tmp_path / 'none'}")
    assert missing.returncode == 2 and "dist-train: error: " in missing.stderr
