"""The `dist-train` command: train, config, eval, predict, export, report, bench, make-shards, submit.

    dist-train make-shards --source digits --out data/digits
    dist-train train --config configs/digits_cpu.yaml optim.lr=0.05 train.epochs=3
    dist-train config --config configs/digits_cpu.yaml   (the resolved config; --defaults, --reference)
    dist-train eval --checkpoint runs/digits/best --data data/digits --json
    dist-train predict --checkpoint runs/digits/best --input images/ --out preds.csv
    dist-train export --checkpoint runs/digits/best --format onnx --out digits.onnx
    dist-train report runs/digits
    dist-train bench --quick
    dist-train submit --nodes 2 --gpus-per-node 8 --config configs/imagenet_resnet50.yaml
    dist-train slurm node|run-dir --config C   (hidden: what slurm/train.sbatch runs per job)

Wrong input (config keys, types, missing or malformed data, bad checkpoints) ends with a
one-line error naming the culprit and exit code 2, before any training starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from dist_train import __version__
from dist_train.commands.slurm import add_submit_arguments, add_train_arguments, cmd_node, cmd_run_dir, cmd_submit
from dist_train.errors import UserInputError

EXIT_USER_ERROR = 2
EXIT_PEER_FAILED = 1
# What gloo and torch.distributed say when the process at the other end has died.
PEER_LOST_MESSAGES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe")


def user_message(exc: UserInputError) -> str:
    """The error in one line; from a DataLoader worker, without the worker's traceback."""
    text = str(exc)
    if "Original Traceback" in text:  # torch re-raised it in the training process
        text = text.rstrip().splitlines()[-1].split(f"{type(exc).__name__}: ", 1)[-1]
    return " ".join(text.splitlines())  # a culprit's name may hold a newline


def lost_a_peer(exc: BaseException) -> bool:
    """True for the error a collective raises because another rank died."""
    return isinstance(exc, RuntimeError) and any(m in str(exc) for m in PEER_LOST_MESSAGES)


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """dist-train's own warnings as the one line they are; others as Python shows them."""
    if Path(filename).is_relative_to(PACKAGE_DIR):
        return f"dist-train: warning: {' '.join(str(message).split())}\n"
    return _python_warning(message, category, filename, lineno, line)


PACKAGE_DIR = Path(__file__).resolve().parent
_python_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    from dist_train.runtime.preemption import EXIT_INTERRUPTED, InterruptedTwice, TrainingStopped

    try:
        return args.handler(args) or 0
    except UserInputError as exc:
        print(f"dist-train: error: {user_message(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as exc:
        print(f"dist-train: {exc}", file=sys.stderr)
        return exc.exit_code
    except InterruptedTwice as exc:
        print(f"\ndist-train: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # Ctrl-C in a command other than `train` (which stops at a step)
        print("\ndist-train: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        if not lost_a_peer(exc):
            raise
        # Another process failed and printed its own error: one line here, not a traceback
        # that would bury it (the launcher names the first failure, its root cause).
        print(f"dist-train: stopping: another process of the job failed ({type(exc).__name__})",
              file=sys.stderr)
        return EXIT_PEER_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dist-train", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"dist-train {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_HelpWithEpilog)

    train = _command(sub, "train", cmd_train, "train a classifier from a config", epilog=_config_keys_help)
    train.add_argument("--config", help="experiment YAML (e.g. configs/digits_cpu.yaml)")
    train.add_argument("--profile-startup", action="store_true",
                       help="print how long each start-up phase took, up to the first optimizer step")
    train.add_argument("--dry-run", action="store_true",
                       help="check the config and the data, print the run's layout, and exit without training")
    train.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    cf = _command(sub, "config", cmd_config, "print the resolved config as YAML (a valid --config)")
    cf.add_argument("--config", help="experiment YAML; without it, the defaults with the overrides")
    cf.add_argument("--defaults", action="store_true", help="the whole default tree")
    cf.add_argument("--reference", action="store_true", help="every key with its type, default and comment")
    cf.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")

    shards = _command(sub, "make-shards", cmd_make_shards, "write webdataset shards + dataset.json")
    shards.add_argument("--source", required=True, choices=["digits", "digit-tags", "synthetic", "imagefolder", "csv"],
                        help="digit-tags: sklearn's digits as a multi-label set (tags such as even, has_loop)")
    shards.add_argument("--root", help="imagefolder: the root/<class>/<image> directory; csv: the CSV file "
                        "(header path,labels; labels separated by spaces or ;)")
    shards.add_argument("--multilabel", action="store_true", help="csv: any number of labels per image")
    shards.add_argument("--out", required=True,
                        help="output directory (must hold no shards), or s3://bucket/prefix to publish there")
    shards.add_argument("--val-fraction", type=float, default=0.2)
    shards.add_argument("--seed", type=int, default=0)
    shards.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    shards.add_argument("--num-samples", type=int, default=2000, help="synthetic: how many images")
    shards.add_argument("--num-classes", type=int, default=10, help="synthetic: how many classes")
    shards.add_argument("--image-size", type=int, default=64, help="synthetic: image side in pixels")

    ev = _command(sub, "eval", cmd_eval, "evaluate a checkpoint on shards")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint directory, e.g. RUN/best")
    ev.add_argument("--data", required=True, help="dataset directory, shard pattern or file")
    ev.add_argument("--split", default="val", help="split of a dataset directory (default val)")
    ev.add_argument("--batch-size", type=int, help="default: the run's validation batch size")
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")

    bench = _command(sub, "bench", cmd_bench, "measure overhead, loader speed, DDP scaling (ratios)")
    bench.add_argument("--quick", action="store_true", help="tiny sizes, seconds per figure (CI)")
    bench.add_argument("--json", help="also write the figures to this JSON file")
    bench.add_argument("--only", help="these figures alone, comma-separated: e.g. ddp_scaling,loop_overhead")

    rep = _command(sub, "report", cmd_report, "plots, summary.md and the per-class table of a run")
    rep.add_argument("run_dir", help="a run directory (train.output_dir)")

    sb = _command(sub, "submit", cmd_submit, "submit training to Slurm (slurm/train.sbatch)")
    add_submit_arguments(sb)

    pr = _command(sub, "predict", cmd_predict, "classify images, folders or shards into a CSV")
    pr.add_argument("--checkpoint", required=True)
    pr.add_argument("--input", required=True, nargs="+", help="image files, folders, shards")
    pr.add_argument("--out", required=True, help="CSV file to write")
    pr.add_argument("--top-k", type=int, default=3)
    pr.add_argument("--batch-size", type=int, default=256)

    ex = _command(sub, "export", cmd_export, "write a checkpoint's model as ONNX or TorchScript, checked on export")
    ex.add_argument("--checkpoint", required=True, help="a model checkpoint directory, e.g. runs/digits/best")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    ex.add_argument("--out", required=True, help="the model file; its sidecar is written to OUT.json")

    # Hidden (no help): what slurm/train.sbatch runs inside a job, not meant to be typed.
    public = list(sub.choices)
    sl = sub.add_parser("slurm", description="what slurm/train.sbatch runs inside a Slurm job")
    steps = sl.add_subparsers(dest="slurm_command", required=True)
    node = steps.add_parser("node", help="start this node's accelerate launch (one srun task per node)")
    node.add_argument("--print", action="store_true", help="print the command instead of running it")
    add_train_arguments(node)
    node.set_defaults(handler=cmd_node)
    run_dir = steps.add_parser("run-dir", help="check the config and print its run directory")
    add_train_arguments(run_dir)
    run_dir.set_defaults(handler=cmd_run_dir)
    sub.metavar = "{" + ",".join(public) + "}"
    return parser


def _command(sub, name: str, handler: Callable, help_text: str,
             epilog: Callable[[], str] | None = None) -> argparse.ArgumentParser:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    parser.epilog_source = epilog
    parser.set_defaults(handler=handler)
    return parser


class _HelpWithEpilog(argparse.ArgumentParser):
    """An epilog built when help is shown (every config key: reading config.py costs
    milliseconds that `dist-train train` itself need not spend)."""

    epilog_source: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.epilog_source is not None:
            self.epilog, self.formatter_class = self.epilog_source(), argparse.RawDescriptionHelpFormatter
        return super().format_help()


def _config_keys_help() -> str:
    from dist_train.commands.config_reference import help_text

    return help_text()


def cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from dist_train.config import Config, load_config, to_dict

    if args.reference:
        from dist_train.commands.config_reference import reference_table

        print(reference_table(), end="")
        return 0
    if args.defaults and (args.config or args.overrides):
        raise UserInputError("config --defaults prints the default tree: it takes no --config or overrides")
    cfg = Config() if args.defaults else load_config(args.config, args.overrides)
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dist_train.runtime.preemption import catch_stop_signals, dump_stacks_on_request

    catch_stop_signals()  # a preemption notice during start-up must not kill the process
    dump_stacks_on_request()
    from dist_train.config import load_config
    from dist_train.data import workers
    from dist_train.runtime import startup_clock

    if args.profile_startup:
        startup_clock.enable()
    cfg = load_config(args.config, args.overrides)
    startup_clock.mark("python and config")
    if args.dry_run:
        return _dry_run(cfg)
    workers.start_helpers(fork_server=False)
    startup_clock.mark("helpers")
    from dist_train.data.datasets import resolve_datasets

    # Shards and labels checked before any process starts work, and before torch is imported:
    # bad data is reported in about a second.
    datasets = resolve_datasets(cfg.data)
    startup_clock.mark("datasets")
    from dist_train.training.engine import fit

    startup_clock.mark("imports")
    # Forked now, with everything imported and before any thread starts, the workers' fork
    # server shares this process's memory (workers.py); else start_run starts one by exec.
    if cfg.data.num_workers > 0 and workers.fork_server_from_here():
        startup_clock.mark("fork server")
    fit(cfg, datasets)
    return 0


def _dry_run(cfg) -> int:
    """What `train` would run, from the config and the data alone: nothing is written and no
    process starts. The process count is this launch's (WORLD_SIZE, as accelerate and torchrun set)."""
    import os

    from dist_train.data.datasets import resolve_datasets
    from dist_train.training.batch_layout import steps_per_epoch

    datasets = resolve_datasets(cfg.data)
    world = int(os.environ.get("WORLD_SIZE", 1))
    global_batch = world * cfg.train.grad_accum_steps * cfg.data.batch_size
    epoch = cfg.data.samples_per_epoch or datasets.train.samples
    print(f"dry run: {datasets.train.samples} train / {datasets.val.samples} val samples, {datasets.num_classes} "
          f"classes; {steps_per_epoch(epoch, global_batch)} steps per epoch of {global_batch} images ({world} "
          f"process(es) x {cfg.train.grad_accum_steps} accumulation x {cfg.data.batch_size}), {cfg.train.epochs} "
          f"epochs, into {cfg.train.output_dir}")
    return 0


def cmd_make_shards(args: argparse.Namespace) -> int:
    from dist_train.data import remote, sources
    from dist_train.data.shard_writer import make_shards
    from dist_train.errors import DataError

    if args.source in ("imagefolder", "csv") and not args.root:
        what = "DIR" if args.source == "imagefolder" else "FILE.csv"
        raise DataError(f"--source {args.source} needs --root {what}")
    if args.source == "digits":
        source = sources.digits()
    elif args.source == "digit-tags":
        source = sources.digit_tags()
    elif args.source == "synthetic":
        source = sources.synthetic(args.num_samples, args.num_classes, args.image_size, args.seed)
    elif args.source == "csv":
        source = sources.csv_list(args.root, multilabel=args.multilabel)
    else:
        source = sources.image_folder(args.root)
    if remote.is_remote(args.out):
        # Written locally first: an upload starts only from complete, checked shards.
        with tempfile.TemporaryDirectory(prefix="dist-train-shards-") as staging:
            manifest = make_shards(source, staging, val_fraction=args.val_fraction, seed=args.seed,
                                   shard_size=args.shard_size, source_name=args.source)
            remote.publish(staging, args.out)
    else:
        manifest = make_shards(source, args.out, val_fraction=args.val_fraction, seed=args.seed,
                               shard_size=args.shard_size, source_name=args.source)
    for name, split in manifest["splits"].items():
        print(f"{name}: {split['samples']} samples in {len(split['shards'])} shards")
    kind = "labels, multi-label" if manifest["task"] == "multilabel" else "classes"
    print(f"wrote {args.out}/dataset.json ({manifest['num_classes']} {kind})")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from dist_train.commands.evaluate import evaluate_checkpoint

    values, confusion, samples, tta = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.batch_size)
    if not PartialState().is_main_process:
        return 0
    if args.json:
        detail = "val/per_label" if isinstance(confusion, dict) else "val/confusion_matrix"
        print(json.dumps({**values, "samples": samples, "tta": tta, detail: confusion}))
    else:
        for name, value in values.items():
            print(f"{name:22s} {value:.6f}")
        print(f"{'samples':22s} {samples}")
        print(f"{'tta':22s} {tta}")  # data.tta of the checkpoint's config: how the numbers were made
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    # The benchmarks prove the product and are not part of it: they live beside the package in
    # a checkout (benchmarks/), never in a wheel.
    checkout = PACKAGE_DIR.parent
    if not (checkout / "benchmarks" / "bench.py").is_file():
        raise UserInputError(f"dist-train bench needs a checkout of the repository: benchmarks/ is not beside "
                             f"the installed package ({PACKAGE_DIR}); clone it and run `make install` there")
    sys.path.insert(0, str(checkout))
    bench_versus = importlib.import_module("benchmarks.bench_versus")
    # Before this process imports torch: memory figures of other processes depend on it.
    targets = importlib.import_module("benchmarks.targets")
    try:
        wanted = targets.figures_wanted(args.only)  # a name mistyped: said before any figure runs
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
    versus = bench_versus.measure(args.quick) if wanted & set(targets.VERSUS_FIGURES) else {}
    bench = importlib.import_module("benchmarks.bench")
    return bench.main([*(["--quick"] if args.quick else []), *(["--json", args.json] if args.json else []),
                       *(["--only", args.only] if args.only else [])], versus)


def cmd_report(args: argparse.Namespace) -> int:
    from dist_train.training.report import load_run, write_report

    print(write_report(args.run_dir))
    print(f"\nwrote {', '.join(load_run(args.run_dir).plot_names)} and summary.md in {args.run_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dist_train.commands.export import SAMPLE_BATCHES, export_model

    done = export_model(args.checkpoint, args.format, args.out)
    print(f"wrote {done.path} ({args.format}) and {done.sidecar}; largest difference from PyTorch's logits "
          f"on sample batches of {' and '.join(map(str, SAMPLE_BATCHES))}: {done.max_abs_diff:.3g}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from dist_train.commands.predict import load_for_inference, write_predictions

    loaded = load_for_inference(args.checkpoint)
    rows = write_predictions(loaded, args.input, args.out, top_k=args.top_k, batch_size=args.batch_size)
    tta = " (flip test-time augmentation: data.tta of the checkpoint)" if loaded.cfg.data.tta == "flip" else ""
    print(f"wrote {rows} predictions to {args.out}{tta}")
    return 0
