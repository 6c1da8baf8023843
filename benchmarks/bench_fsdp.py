"""The memory figures of sharding and activation checkpointing in `dist-train bench`.

  fsdp_state_vs_ddp        one process's parameter + gradient + optimizer-state bytes under
                           2-process FSDP / under DDP, as the optimizer step holds them (the
                           local shards under FSDP): a ViT-S/16 at 224 px trained with AdamW by
                           dist-train's own train_step (benchmarks/fsdp_check.py; --quick: a tiny ViT)
  activation_memory_ratio  the resident memory a forward + backward of a ViT-Ti/16 at 224 px,
                           batch 32, adds at its peak, with model.grad_checkpointing / without;
                           each in a fresh process that returns freed memory to the system
                           (--quick: 64 px)

    python -m benchmarks.bench_fsdp [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FSDP_CHECK = REPO / "benchmarks" / "fsdp_check.py"
CPU_DDP = REPO / "launch" / "cpu-ddp.yaml"
VIT_S16 = ["--image-size", "224", "--patch-size", "16", "--dim", "384", "--depth", "12", "--heads", "6"]


def fsdp_state_vs_ddp(quick: bool) -> tuple[float, dict[str, dict[str, int]]]:
    """(FSDP's bytes / DDP's, both breakdowns of rank 0)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_DDP),
               "--main_process_port", str(29300 + os.getpid() % 300), str(FSDP_CHECK), "--out", tmp,
               "--modes", "ddp,fsdp", "--steps", "1", "--accum", "1", "--batch", "1", *([] if quick else VIT_S16)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=_env())
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        held = {mode: json.loads((Path(tmp) / f"{mode}-rank0.json").read_text())["bytes"] for mode in ("ddp", "fsdp")}
    return sum(held["fsdp"].values()) / sum(held["ddp"].values()), held


def activation_memory_ratio(quick: bool) -> tuple[float, dict[str, float]]:
    """(peak MiB added with checkpointing / without, both)."""
    peaks = {}
    for checkpointing in (False, True):
        cmd = [sys.executable, "-m", "benchmarks.bench_fsdp", "--activations", "--image-size", "64" if quick else "224"]
        cmd += ["--checkpointing"] if checkpointing else []
        # Large blocks go to mmap and back to the system when freed: the resident size then
        # follows the tensors alive, not what the allocator keeps for later.
        env = _env() | {"MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
        peaks["with" if checkpointing else "without"] = json.loads(out.stdout.splitlines()[-1])["peak_mib"]
    return peaks["with"] / peaks["without"], peaks


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _activations_worker(image_size: int, checkpointing: bool, batch: int = 32) -> None:
    import torch
    import torch.nn.functional as F

    from dist_train.recipe.models import create_model, enable_grad_checkpointing

    torch.manual_seed(0)
    model = create_model("timm/vit_tiny_patch16_224", 10, 3, {"img_size": image_size})
    if checkpointing:
        enable_grad_checkpointing(model, "timm/vit_tiny_patch16_224")
    images, labels = torch.randn(batch, 3, image_size, image_size), torch.randint(0, 10, (batch,))
    base, peak, done = _rss(), [0], threading.Event()

    def sample() -> None:  # torch's kernels release the GIL: this sees the peak within a millisecond
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    F.cross_entropy(model(images), labels).backward()
    done.set()
    sampler.join()
    print(json.dumps({"peak_mib": (max(peak[0], _rss()) - base) / 2**20}))


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--activations", action="store_true", help="(internal) one activation-memory measure")
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    if args.activations:
        _activations_worker(args.image_size, args.checkpointing)
        return
    state, held = fsdp_state_vs_ddp(args.quick)
    activations, peaks = activation_memory_ratio(args.quick)
    print(json.dumps({"fsdp_state_vs_ddp": round(state, 3), "bytes": held,
                      "activation_memory_ratio": round(activations, 3), "activation_peak_mib": peaks}))


if __name__ == "__main__":
    main()
