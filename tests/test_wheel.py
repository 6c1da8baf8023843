"""dist-train installed as a wheel (not editable), as on a cluster: the package alone, with the
launch configs and the sbatch template it needs, and nothing of the proving ground."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, Path]:
    """(the wheel, a fresh venv holding it): built from this checkout, installed without its
    dependencies, which the venv reads from this interpreter's site-packages (a plain path: the
    editable install's own hook there is never run)."""
    tmp = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools builds in the source tree, and its build/ would keep files
    # of modules since removed.
    source = tmp / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "runs", "data", "wandb", "*.egg-info", "__pycache__", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp / "dist"), str(source)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp / "dist").glob("dist_train-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "project-deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--quiet",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return wheel, env_dir


def _run(env_dir: Path, *args: str, cwd: Path, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env |= {"PATH": f"{env_dir / 'bin'}:{env['PATH']}", "WANDB_API_KEY": "", **(extra_env or {})}
    return subprocess.run([str(env_dir / "bin" / "dist-train"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_wheel_holds_the_package_and_its_launch_files_only(wheel_venv):
    wheel, _ = wheel_venv
    names = zipfile.ZipFile(wheel).namelist()
    print("\n".join(names))  # the wheel's files, for the record (pytest -s)
    package = [n for n in names if not n.startswith("dist_train-")]
    assert all(n.startswith("dist_train/") for n in package), package
    assert not [n for n in package if "bench" in n or "local_servers" in n or n.startswith("dist_train/tests")]
    assert {"dist_train/assets/slurm/train.sbatch", "dist_train/assets/launch/cpu-ddp.yaml",
            "dist_train/assets/launch/multi-node.yaml"} <= set(names)
    # PEP 639: the SPDX expression and the license text (setuptools warned at every build of
    # the old `license = {text = ...}` table that builds stop accepting it in 2027).
    metadata = zipfile.ZipFile(wheel).read("dist_train-0.1.0.dist-info/METADATA").decode()
    assert "License-Expression: Apache-2.0" in metadata and "dist_train-0.1.0.dist-info/licenses/LICENSE" in names


def test_submit_dry_run_from_the_wheel_names_a_script_that_exists(wheel_venv, tmp_path):
    _, env_dir = wheel_venv
    run_dir = tmp_path / "run"
    result = _run(env_dir, "submit", "--nodes", "2", "--dry-run", "--config", str(REPO / "configs" / "digits_cpu.yaml"),
                  f"train.output_dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cmd = shlex.split(result.stdout.strip().splitlines()[-1])
    [script] = [arg for arg in cmd if arg.endswith("train.sbatch")]
    assert Path(script).is_file() and not Path(script).is_relative_to(REPO), script
    assert "dist_train/assets/slurm" in script


def test_slurm_node_print_from_the_wheel_names_a_launch_config_that_exists(wheel_venv, tmp_path):
    _, env_dir = wheel_venv
    allocation = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "n[1-2]",
                  "SLURM_STEP_ID": "0", "MAIN_PROCESS_ADDR": "127.0.0.1"}
    result = _run(env_dir, "slurm", "node", "--print", "--config", str(REPO / "configs" / "digits_cpu.yaml"),
                  f"train.output_dir={tmp_path / 'run'}", cwd=tmp_path, extra_env=allocation)
    assert result.returncode == 0, result.stderr
    cmd = shlex.split(result.stdout.strip().splitlines()[-1])
    config = cmd[cmd.index("--config_file") + 1]
    assert Path(config).is_file() and not Path(config).is_relative_to(REPO), config
    assert config.endswith("dist_train/assets/launch/cpu-ddp.yaml")


def test_bench_from_the_wheel_says_where_the_benchmarks_are(wheel_venv, tmp_path):
    _, env_dir = wheel_venv
    result = _run(env_dir, "bench", "--quick", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "needs a checkout of the repository" in result.stderr
