"""What a run records: `metrics.jsonl` in the run directory, and wandb through accelerate.

Both are written by the main process only. `metrics.jsonl` holds one JSON object per line:
validation records (`epoch`, `step`, every `val/*` metric, the confusion matrix, epoch train
statistics) and train records every `train.log_every_steps` (`train/loss`, `lr`,
`images_per_sec`). Lines are flushed as written, so the file can be followed during a run.

wandb is optional and never fatal: with `tracking.mode=auto` it runs online only when a W&B
API key is configured (`WANDB_API_KEY` or `wandb login`), otherwise offline, with its files
under `RUN/wandb/` for a later `wandb sync`. If wandb cannot start at all, the run goes on
without it after one warning.
"""

from __future__ import annotations

import json
import netrc
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator

from dist_train import atomic_file
from dist_train.config import Config, TrackingConfig, to_dict
from dist_train.errors import DataError

if TYPE_CHECKING:
    from accelerate.tracking import WandBTracker

WANDB_HOST = "api.wandb.ai"


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")


class RunTracker:
    """metrics.jsonl plus, when enabled, a wandb run fed through `accelerator.log`.

    wandb starts beside training, on a thread of its own, not before the first step: importing
    it and starting its service takes about a second. Records logged meanwhile wait in order
    and are sent as soon as it is up; `close` (before `accelerator.end_training`) waits for it.
    """

    def __init__(self, accelerator: Accelerator, cfg: Config, run_dir: Path, class_names: list[str]):
        self.accelerator = accelerator
        self.class_names = class_names
        self.metrics_log = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
        self.wandb = False  # a wandb run is up and receives the records
        self._starting: Future | None = None
        self._waiting: list[dict[str, Any]] = []  # records logged before wandb was up
        if cfg.tracking.wandb and accelerator.is_main_process:
            starter = ThreadPoolExecutor(1, thread_name_prefix="wandb-start")
            self._starting = starter.submit(_start_wandb, cfg, run_dir)
            starter.shutdown(wait=False)  # its one thread ends when wandb is up

    def log(self, record: dict[str, Any]) -> None:
        self.metrics_log.log(record)
        if self.wandb or self._starting is not None:
            self._waiting.append(record)
            self._send(wait=False)

    def close(self) -> None:
        """Send what waits for wandb, waiting for it to start if it has not yet."""
        self._send(wait=True)

    def _send(self, wait: bool) -> None:
        if self._starting is not None:
            if not wait and not self._starting.done():
                return
            tracker, self._starting = self._starting.result(), None
            if tracker is not None:
                self.accelerator.trackers.append(tracker)
                self.wandb = True
        if self.wandb:
            for record in self._waiting:
                self.accelerator.log(self._wandb_values(record), step=record["step"])
        self._waiting.clear()

    def _wandb_values(self, record: dict[str, Any]) -> dict[str, Any]:
        values = {k: v for k, v in record.items() if isinstance(v, int | float) and k not in ("epoch", "step")}
        values["epoch"] = record["epoch"]
        if "val/confusion_matrix" in record:
            values["val/confusion_matrix"] = _confusion_table(record["val/confusion_matrix"], self.class_names)
        if "val/per_label" in record:  # multi-label: each label's average precision, as its own chart
            values |= {f"val/ap/{name}": ap for name, ap in zip(self.class_names, record["val/per_label"]["ap"],
                                                                 strict=True)}
        return values


def wandb_mode(cfg: TrackingConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if _has_wandb_credentials() else "offline"


def _start_wandb(cfg: Config, run_dir: Path) -> WandBTracker | None:
    mode = wandb_mode(cfg.tracking)
    init = {
        "name": cfg.tracking.run_name or run_dir.resolve().name,
        "tags": cfg.tracking.tags,
        "dir": str(run_dir),
        "mode": mode,
    }
    try:
        import wandb
        from accelerate.tracking import WandBTracker

        tracker = WandBTracker(cfg.tracking.project, **init, settings=wandb.Settings(quiet=True, init_timeout=60))
        tracker.start()
        tracker.store_init_configuration(to_dict(cfg))
    except Exception as exc:  # tracking must never stop training
        warnings.warn(f"wandb could not start ({mode}): {exc}; training continues without it", stacklevel=2)
        return None
    return tracker


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(WANDB_HOST) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def _confusion_table(matrix: list[list[int]], class_names: list[str]):
    import wandb

    rows = [[class_names[t], class_names[p], count] for t, row in enumerate(matrix) for p, count in enumerate(row)]
    return wandb.Table(columns=["true", "predicted", "count"], data=rows)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the records up to `last_step`: a resumed run logs the later ones again (and a last
    line cut short, by a full disk or a kill mid-write, goes)."""
    if not path.is_file():
        return
    kept = [line for line, record in _lines_and_records(path) if record["step"] <= last_step]
    atomic_file.write_text(path, "".join(f"{line}\n" for line in kept))


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [record for _, record in _lines_and_records(Path(path))]


def _lines_and_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Each line of a metrics.jsonl with its record. A last line that is not JSON is a write cut
    short (a full disk, a kill): it is left out with a warning, so that the run can still resume
    and report. A bad line before the last is damage, named."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    found = []
    for number, line in enumerate(lines, start=1):
        try:
            found.append((line, json.loads(line)))
        except ValueError:
            if number < len(lines):
                raise DataError(f"{path}: line {number} is not a JSON record") from None
            warnings.warn(f"{path}: its last line is cut short ({len(line)} characters); left out", stacklevel=3)
    return found
