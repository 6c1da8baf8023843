"""Knowledge distillation on real data, few images per class: does a small student gain from a
larger teacher's logits?

    .venv/bin/python benchmarks/distill.py                  # 5 seeds, about 6 minutes on 2 cores
    .venv/bin/python benchmarks/distill.py --seeds 1 --epochs 5   # a smoke run

sklearn's digits (real 8x8 scans, no download), the split of benchmarks/recipe.py: 20 training
images per class, 50 other validation images per class, picked per seed. Per seed, the teacher
is configs/digits_cpu.yaml's small_cnn (width 32, 65.8k parameters) trained on that split;
the student is the same network at width 8 (about 4.7k parameters) and the same config, trained
without and with distillation from that teacher (configs/digits_distill_cpu.yaml's keys), all
through `dist-train train` on one process. Reported: the final validation accuracy, mean and
spread over the seeds.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.recipe import report, run, seeds_parser, write_subset

STUDENT = ("model.kwargs={width: 8}",)
KD = {
    "student + KD, T 4, alpha 0.5": ("distill.temperature=4", "distill.alpha=0.5"),
    "student + KD, T 1, alpha 0.5 (DeiT's soft defaults)": ("distill.temperature=1", "distill.alpha=0.5"),
    "student + KD, T 4, alpha 0.9": ("distill.temperature=4", "distill.alpha=0.9"),
}


def main() -> int:
    args = seeds_parser(__doc__.split("\n")[0]).parse_args()
    started = time.perf_counter()
    names = ["teacher (small_cnn, width 32)", "student (width 8), no KD", *KD]
    scores: dict[str, list[float]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            train, val = write_subset(Path(tmp) / f"data-{seed}", seed, args.train_per_class, 50)
            teacher = Path(tmp) / f"teacher-{seed}"
            runs = {names[0]: (teacher, ()), names[1]: (Path(tmp) / f"student-{seed}", STUDENT)}
            runs |= {name: (Path(tmp) / f"kd-{seed}-{i}", (*STUDENT, f"distill.teacher={teacher}/best", *options))
                     for i, (name, options) in enumerate(KD.items())}
            for name, (out, options) in runs.items():  # the teacher first: the others read its best/
                scores[name].append(run(train, val, out, seed, args.epochs, options))
                print(f"seed {seed}: {name}: {scores[name][-1]:.4f}", flush=True)
    report(scores, names[1], args, started, rows="run", versus="vs the student without KD")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
