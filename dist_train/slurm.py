"""`python -m dist_train.slurm node|run-dir ...`: what the sbatch scripts of earlier releases
run, kept for jobs submitted with a copy of one; the same as `python -m dist_train slurm ...`
(commands/slurm.py does the work)."""

import sys

from dist_train.cli import main

if __name__ == "__main__":
    sys.exit(main(["slurm", *sys.argv[1:]]))
