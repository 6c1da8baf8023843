"""dist-train: train image classifiers on one CPU, a workstation of GPUs, or a Slurm cluster.

The Python API is the command line's, in a notebook or a script:

    from dist_train import fit, load_config

    cfg = load_config("configs/digits_cpu.yaml", ["train.epochs=3", "data.train=data/digits", "data.val=data/digits"])
    result = fit(cfg)   # FitResult: best_metrics, best_epoch, output_dir, model (the trained network)

Both are imported on first use: `import dist_train` stays light (no torch).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Config", "FitResult", "__version__", "fit", "load_config"]

# Where each name of the API lives, imported when first asked for (PEP 562): the package's
# root stays the ground floor that every module may import (tests/test_package_layout.py).
_LAZY = {"fit": "dist_train.training.engine", "FitResult": "dist_train.training.run",
         "load_config": "dist_train.config", "Config": "dist_train.config"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dist_train' has no attribute {name!r}")
