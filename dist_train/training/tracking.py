"""What a run records: `metrics.jsonl` in the run directory, and the trackers: wandb,
TensorBoard and MLflow, through accelerate's trackers.

All are written by the main process only. `metrics.jsonl` holds one JSON object per line:
validation records (`epoch`, `step`, every `val/*` metric, the confusion matrix, epoch train
statistics) and train records every `train.log_every_steps` (`train/loss`, `lr`,
`images_per_sec`). Lines are flushed as written, so the file can be followed during a run.

Trackers are optional and never fatal: each starts beside training, on a thread, and if one
cannot start the run goes on without it after one warning. wandb with `tracking.mode=auto`
runs online only when a W&B API key is configured (`WANDB_API_KEY` or `wandb login`), else
offline under `RUN/wandb/`; TensorBoard writes `RUN/tensorboard/`; MLflow logs to
`tracking.mlflow_uri`, by default a file store in `RUN/mlruns/` (offline).

One run per tracker across resumes and requeues: `RUN/trackers.json` keeps each tracker's run
(wandb's id, MLflow's run id) and the last record it was sent, so a resumed launch continues
the same runs and sends each record once. A resume is bitwise, so the records a killed launch
had already sent (between its checkpoint and its death) come out equal and are not sent again;
TensorBoard hides whatever of the earlier launch's events lie past that record (its
`purge_step`), and MLflow's own history says what it already holds. wandb hands records to
its service, which a kill can stop before it writes them: it is sent everything from the
checkpoint on again, and keeps the first of a step it gets twice (online at once, offline runs
when `wandb sync` uploads them in order). Where the resumed launch
changed the config (training/resume_config.py), its records from the checkpoint on are sent
again: wandb keeps the earlier values of steps it already has, MLflow holds both.
"""

from __future__ import annotations

import json
import netrc
import os
import time
import uuid
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from dist_train import atomic_file
from dist_train.config import Config, TrackingConfig, to_dict
from dist_train.errors import DataError

WANDB_HOST = "api.wandb.ai"
TRACKERS_FILE = "trackers.json"


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=True) + "\n")


def record_order(record: dict[str, Any]) -> tuple[int, int]:
    """Where a record comes in a run: its step, then train (0) before validation (1)."""
    return record["step"], int("val/loss" in record)


class RunTracker:
    """metrics.jsonl plus the trackers the config enables, each fed every record once.

    They start beside training, on a thread of their own, not before the first step: importing
    wandb or mlflow and starting their services takes a second or more. Records logged
    meanwhile wait in order and are sent as soon as they are up; `close` (before
    `accelerator.end_training`) waits for them. `resumed_at`: the step a resumed launch starts
    from, `replanned`: whether it changed the config (the module docstring says why).
    """

    def __init__(self, accelerator: Accelerator, cfg: Config, run_dir: Path, class_names: list[str],
                 resumed_at: int | None = None, replanned: bool = False):
        self.accelerator = accelerator
        self.class_names = class_names
        self.run_dir = run_dir
        self.metrics_log = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
        self.trackers: dict[str, Any] = {}  # name -> an accelerate tracker that is up
        self.sent: dict[str, dict[str, Any]] = {}  # name -> {"run": its id, "through": [step, kind]}
        self._starting: Future | None = None
        self._waiting: list[dict[str, Any]] = []  # records logged before the trackers were up
        wanted = [name for name, on in (("wandb", cfg.tracking.wandb), ("tensorboard", cfg.tracking.tensorboard),
                                        ("mlflow", cfg.tracking.mlflow)) if on]
        if wanted and accelerator.is_main_process:
            saved = _saved_trackers(run_dir) if resumed_at is not None else {}
            for name, entry in saved.items():
                # wandb hands records to its service, which may not have written them when a
                # kill comes: they are sent again from the checkpoint on, and wandb keeps the
                # first of a step it receives twice (equal: the resume is bitwise).
                if replanned or name == "wandb":
                    entry["through"] = min(entry.get("through", [0, 0]), [resumed_at, 1])
            self.sent = {name: dict(entry) for name, entry in saved.items()}  # kept for one that cannot start now
            starter = ThreadPoolExecutor(1, thread_name_prefix="trackers-start")
            self._starting = starter.submit(_start_trackers, wanted, cfg, run_dir, saved)
            starter.shutdown(wait=False)  # its one thread ends when the trackers are up

    def log(self, record: dict[str, Any]) -> None:
        self.metrics_log.log(record)
        if self.trackers or self._starting is not None:
            self._waiting.append(record)
            self._send(wait=False)

    def close(self) -> None:
        """Send what waits for the trackers, waiting for them to start if they have not yet."""
        self._send(wait=True)

    def _send(self, wait: bool) -> None:
        if self._starting is not None:
            if not wait and not self._starting.done():
                return
            started, self._starting = self._starting.result(), None
            for name, (tracker, entry) in started.items():
                self.trackers[name] = tracker
                self.sent[name] = entry
                self.accelerator.trackers.append(tracker)  # finished by accelerator.end_training
            if started:  # kept at once: a launch stopped before its first record has its runs too
                self._save_sent()
        if self._waiting and self.trackers:
            for name, tracker in self.trackers.items():
                through = tuple(self.sent[name].get("through", (-1, 0)))
                for record in self._waiting:
                    if record_order(record) > through:
                        tracker.log(self._values(record, name), step=record["step"])
                        through = record_order(record)
                self.sent[name]["through"] = list(through)
            self._save_sent()
        self._waiting.clear()

    def _save_sent(self) -> None:
        atomic_file.write_text(self.run_dir / TRACKERS_FILE, json.dumps(self.sent, indent=2) + "\n")

    def _values(self, record: dict[str, Any], tracker: str) -> dict[str, Any]:
        values = {k: v for k, v in record.items() if isinstance(v, int | float) and k not in ("epoch", "step")}
        values["epoch"] = record["epoch"]
        if "val/per_label" in record:  # multi-label: each label's average precision, as its own chart
            values |= {f"val/ap/{name}": ap for name, ap in zip(self.class_names, record["val/per_label"]["ap"],
                                                                 strict=True)}
        if tracker == "wandb" and "val/confusion_matrix" in record:
            values["val/confusion_matrix"] = _confusion_table(record["val/confusion_matrix"], self.class_names)
        return values


def wandb_mode(cfg: TrackingConfig) -> str:
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if _has_wandb_credentials() else "offline"


def _saved_trackers(run_dir: Path) -> dict[str, dict[str, Any]]:
    """What the run's earlier launches kept of their trackers' runs ({} if nothing or damaged)."""
    try:
        saved = json.loads((run_dir / TRACKERS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in saved.items() if isinstance(v, dict)} if isinstance(saved, dict) else {}


def _start_trackers(names: list[str], cfg: Config, run_dir: Path,
                    saved: dict[str, dict[str, Any]]) -> dict[str, tuple[Any, dict[str, Any]]]:
    """Each tracker started (continuing its saved run), with what it already holds; one that
    cannot start is left out with a warning."""
    starters = {"wandb": _start_wandb, "tensorboard": _start_tensorboard, "mlflow": _start_mlflow}
    started = {}
    for name in names:
        entry = dict(saved.get(name, {}))
        try:
            tracker = starters[name](cfg, run_dir, entry)
        except Exception as exc:  # tracking must never stop training
            label = f"wandb ({wandb_mode(cfg.tracking)})" if name == "wandb" else name
            warnings.warn(f"{label} could not start: {' '.join(str(exc).split())[:300]}; training continues "
                          "without it", stacklevel=1)  # named as dist-train's own: one line
            continue
        started[name] = (tracker, entry)
    return started


def _start_wandb(cfg: Config, run_dir: Path, entry: dict[str, Any]):
    import wandb
    from accelerate.tracking import WandBTracker

    entry.setdefault("run", uuid.uuid4().hex[:12])  # the id every launch of the run continues
    tracker = WandBTracker(cfg.tracking.project, name=cfg.tracking.run_name or run_dir.resolve().name,
                           tags=cfg.tracking.tags, dir=str(run_dir), mode=wandb_mode(cfg.tracking),
                           id=entry["run"], resume="allow", settings=wandb.Settings(quiet=True, init_timeout=60))
    tracker.start()
    tracker.store_init_configuration(to_dict(cfg))
    return tracker


def _start_tensorboard(cfg: Config, run_dir: Path, entry: dict[str, Any]):
    from accelerate.tracking import TensorBoardTracker

    through = entry.get("through")
    # Events of an earlier launch past the last record it sent are hidden: they come again.
    purge = {"purge_step": through[0] + 1} if through else {}
    tracker = TensorBoardTracker("", run_dir / "tensorboard", **purge)
    tracker.start()
    return tracker


def _start_mlflow(cfg: Config, run_dir: Path, entry: dict[str, Any]):
    import mlflow
    from accelerate.tracking import MLflowTracker

    class MLflowRunTracker(MLflowTracker):
        """accelerate's, logging to its run by id: mlflow's active run is per thread, and this
        one is started on the trackers' thread, not the training thread that logs."""

        def log(self, values: dict, step: int | None = None, **kwargs) -> None:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, step or 0) for k, v in values.items() if isinstance(v, int | float)]
            mlflow.tracking.MlflowClient().log_batch(self.active_run.info.run_id, metrics=metrics)

        def finish(self) -> None:
            mlflow.tracking.MlflowClient().set_terminated(self.active_run.info.run_id)

    uri = cfg.tracking.mlflow_uri or (run_dir / "mlruns").resolve().as_uri()
    if uri.startswith("file:"):
        # MLflow 3 keeps its file store for offline use only when asked: the default here,
        # so that a run needs no server.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    mlflow.set_tracking_uri(uri)
    tags = dict.fromkeys(cfg.tracking.tags, "") or None
    tracker = MLflowRunTracker(cfg.tracking.project, run_id=entry.get("run"),
                            run_name=cfg.tracking.run_name or run_dir.resolve().name, tags=tags)
    tracker.start()
    if "run" not in entry:
        tracker.store_init_configuration(_flat(to_dict(cfg)))
    entry["run"] = tracker.active_run.info.run_id
    client = mlflow.tracking.MlflowClient()
    # What the run already holds, as its history says (a kill can come between a record's
    # send and trackers.json's update).
    held = [(point.step, kind) for kind, key in ((0, "train/loss"), (1, "val/loss"))
            for point in client.get_metric_history(entry["run"], key)]
    if held:
        entry["through"] = list(max([*held, tuple(entry.get("through", (-1, 0)))]))
    return tracker


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """data.batch_size: 64, ... (MLflow's params are flat, 500 characters at most each)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and prefix == "":
            flat |= _flat(value, f"{key}.")
        else:
            flat[f"{prefix}{key}"] = str(value)[:500]
    return flat


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
