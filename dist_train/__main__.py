"""`python -m dist_train ...`: the same as the `dist-train` console script (and what
`accelerate launch -m dist_train ...` runs in every process)."""

from dist_train.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
