"""The CLI's verbs beyond train: evaluate.py (eval), predict.py, export.py, slurm.py (submit,
and what slurm/train.sbatch runs on each node)."""
