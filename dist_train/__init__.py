"""dist-train: train image classifiers on one CPU, a workstation of GPUs, or a Slurm cluster."""

__version__ = "0.1.0"
