"""The run directory (`train.output_dir`): which checkpoint a run resumes from, what a fresh
start writes there, and the plots and summary a finished run leaves."""

from __future__ import annotations

import fcntl
import os
import warnings
from pathlib import Path

from accelerate import Accelerator

from dist_train.checkpoint import find_resumable, verify
from dist_train.config import Config, save_config
from dist_train.errors import ConfigError
from dist_train.training.report import write_report


def find_resume_checkpoint(resume: str | None, out: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        return find_resumable(out)
    path = Path(resume)
    verify(path)  # a named checkpoint must be good: no silent fallback
    return path


LOCK_NAME = ".lock"
_held: dict[Path, int] = {}  # run directories this process holds, and the lock file's descriptor


def lock_run_dir(out: Path) -> None:
    """One run per directory: the main process holds an exclusive lock on RUN/.lock while it
    lives (the kernel drops it when the process ends, however it ends). A second run into the
    same directory would interleave its records with the first's and overwrite its best/."""
    key = out.resolve()
    if key in _held:
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ConfigError(f"train.output_dir {out} is in use by another run (process {holder}); wait for it to "
                          "end, or choose another directory") from None
    except OSError as exc:  # a file system without locks (some network ones): run unguarded, say so
        os.close(fd)
        warnings.warn(f"train.output_dir {out}: cannot be locked ({exc.strerror}); make sure no other run "
                      "writes there", stacklevel=2)
        return
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = fd


def unlock_run_dir(out: Path) -> None:
    fd = _held.pop(out.resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock


def prepare_run_dir(cfg: Config, out: Path, accelerator: Accelerator, resuming: bool) -> None:
    if accelerator.is_main_process:
        lock_run_dir(out)
    if (out / "metrics.jsonl").exists() and not resuming and cfg.train.resume != "auto":
        raise ConfigError(
            f"train.output_dir {out} already holds a run (metrics.jsonl); choose another directory "
            "or continue it with train.resume=auto"
        )
    accelerator.wait_for_everyone()  # every rank has checked before the main process writes
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")  # what was asked; meta.json says how it ran
        if not resuming:  # a fresh start, also under resume=auto without a checkpoint yet
            (out / "metrics.jsonl").write_text("")
    accelerator.wait_for_everyone()


def write_plots_and_summary(out: Path) -> None:
    """The run's PNG plots and summary.md; a failure here must not fail a finished run."""
    try:
        write_report(out)
    except Exception as exc:
        warnings.warn(f"could not write plots and summary: {exc} (retry: dist-train report {out})", stacklevel=2)
