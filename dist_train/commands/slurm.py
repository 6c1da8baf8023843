"""Slurm: turn an allocation into one `accelerate launch` per node, and submit jobs.

`slurm/train.sbatch` runs `dist-train slurm node --config C [overrides]` as one task per node
(srun). Each reads the allocation from Slurm's environment and starts

    accelerate launch --config_file launch/{multi-node,cpu-ddp}.yaml
        --num_machines $SLURM_NNODES --num_processes NODES*GPUS --machine_rank $SLURM_NODEID
        --main_process_ip <address of the allocation's first node> --main_process_port P
        -m dist_train train --config C train.resume=auto [overrides]

GPUs per node come from `SLURM_GPUS_ON_NODE` (set with `--gpus-per-node`) or else from CUDA;
a node without GPUs runs `PROCESSES_PER_NODE` (default 1) CPU processes over gloo.

    dist-train slurm node --print --config C                  # show the command, run nothing
    dist-train submit --nodes 4 --gpus-per-node 8 --config C  # sbatch with logs in the run dir

Preemption: srun passes SIGUSR1 (or Slurm's SIGTERM) to every process of the step. torchrun,
the launcher under accelerate, would die of SIGUSR1 and orphan its workers unless told to
handle it (`PET_SIGNALS_TO_HANDLE`, torchrun's --signals_to_handle); it then waits
`PET_SHUTDOWN_TIMEOUT` seconds for the workers to save before killing them (torch's default of
30 s is short for a large model).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dist_train.errors import ConfigError, UserInputError

# Package data (pyproject.toml): in a checkout, links to the top-level launch/ and slurm/ (resolved,
# so commands name the files users read); in an installed wheel, copies of them.
ASSETS = Path(__file__).resolve().parents[1] / "assets"
LAUNCH_DIR = (ASSETS / "launch").resolve()
SBATCH_SCRIPT = (ASSETS / "slurm").resolve() / "train.sbatch"
SIGNALS_TO_FORWARD = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
DEFAULT_SHUTDOWN_TIMEOUT_S = 120  # grace for the final save; also how long a survivor of a crash may linger


@dataclass(frozen=True)
class NodeLaunch:
    """Where this node stands in the job: everything `accelerate launch` needs to know."""

    num_nodes: int
    node_rank: int
    processes_per_node: int
    uses_gpus: bool
    main_address: str
    main_port: int

    @property
    def num_processes(self) -> int:
        return self.num_nodes * self.processes_per_node


def job_hosts(hostlist: str) -> list[str]:
    """The allocation's host names in order: `scontrol show hostnames` (Slurm's own reading of
    its host lists), or where scontrol cannot say, `expand_hostlist`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        out = []
    return out or expand_hostlist(hostlist)


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list, e.g. `gpu[01-03,07],login1` -> gpu01 gpu02 gpu03 gpu07 login1;
    any number of bracket groups in a name (`rack[1-2]-node[01-02]`: four hosts, rack by rack)."""
    hosts: list[str] = []
    for item in _top_level_items(hostlist):
        hosts.extend(_expanded(item))
    return hosts


def _top_level_items(hostlist: str) -> list[str]:
    """The list split at its commas outside brackets."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(hostlist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            items.append(hostlist[start:i])
            start = i + 1
    items.append(hostlist[start:])
    return [item for item in items if item]


def _expanded(name: str) -> list[str]:
    """One name's hosts: its first bracket group expanded, then the rest of the name the same way."""
    match = re.search(r"\[([^\]]*)\]", name)
    if match is None:
        return [name]
    prefix, rest = name[:match.start()], _expanded(name[match.end():])
    values: list[str] = []
    for part in match.group(1).split(","):
        first, _, last = part.partition("-")
        width = len(first)  # keep zero padding: gpu[08-10] -> gpu08 gpu09 gpu10
        values += [first] if not last else [f"{i:0{width}d}" for i in range(int(first), int(last) + 1)]
    return [prefix + value + tail for value in values for tail in rest]


def node_address(host: str) -> str:
    """The address Slurm itself uses for `host` (NodeAddr), or the name when scontrol cannot say.

    NodeAddr is what slurmd listens on; node names need not resolve in DNS.
    """
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", host], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return host
    match = re.search(r"\bNodeAddr=(\S+)", out)
    return match.group(1) if match else host


def node_launch_from_env(env: Mapping[str, str], cuda_devices: int | None = None) -> NodeLaunch:
    """This node's place in the allocation described by Slurm's variables."""
    missing = [k for k in ("SLURM_JOB_ID", "SLURM_NNODES", "SLURM_NODEID", "SLURM_JOB_NODELIST")
               if k not in env]
    if missing:
        raise UserInputError(f"not inside a Slurm job step ({', '.join(missing)} unset): run this "
                             "through slurm/train.sbatch, one task per node")
    gpus = int(env["SLURM_GPUS_ON_NODE"]) if env.get("SLURM_GPUS_ON_NODE") else None
    if gpus is None:
        gpus = cuda_devices if cuda_devices is not None else _cuda_device_count()
    uses_gpus = gpus > 0
    # One process per GPU, or one on a CPU node, unless PROCESSES_PER_NODE says otherwise.
    per_node = int(env.get("PROCESSES_PER_NODE") or (gpus if uses_gpus else 1))
    main_host = job_hosts(env["SLURM_JOB_NODELIST"])[0]
    address = env.get("MAIN_PROCESS_ADDR") or node_address(main_host)
    # One port per job, so that jobs sharing a node do not collide; stable across requeues.
    port = int(env.get("MAIN_PROCESS_PORT") or 20000 + int(env["SLURM_JOB_ID"]) % 20000)
    return NodeLaunch(num_nodes=int(env["SLURM_NNODES"]), node_rank=int(env["SLURM_NODEID"]),
                      processes_per_node=per_node, uses_gpus=uses_gpus,
                      main_address=address, main_port=port)


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count()


def with_resume(train_args: list[str]) -> list[str]:
    """Every (re)start of a job continues its newest checkpoint, unless the user chose one."""
    if any(arg.startswith("train.resume=") for arg in train_args):
        return list(train_args)
    return [*train_args, "train.resume=auto"]


def accelerate_command(launch: NodeLaunch, train_args: list[str],
                       launch_dir: Path = LAUNCH_DIR) -> list[str]:
    config = "multi-node.yaml" if launch.uses_gpus else "cpu-ddp.yaml"
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(launch_dir / config),
        "--num_machines", str(launch.num_nodes),
        "--num_processes", str(launch.num_processes),
        "--machine_rank", str(launch.node_rank),
        "--main_process_ip", launch.main_address,
        "--main_process_port", str(launch.main_port),
        "--rdzv_backend", "static",
        "-m", "dist_train", "train", *with_resume(train_args),
    ]


def launch_environment(env: Mapping[str, str]) -> dict[str, str]:
    out = dict(env)
    out.setdefault("PET_SIGNALS_TO_HANDLE", SIGNALS_TO_FORWARD)
    out.setdefault("PET_SHUTDOWN_TIMEOUT", str(DEFAULT_SHUTDOWN_TIMEOUT_S))
    return out


def run_dir_of(config: str | None, overrides: list[str]) -> Path:
    """The run directory of a config (checks the whole config: errors before any node starts)."""
    from dist_train.config import load_config

    return Path(load_config(config, overrides).train.output_dir)


def sbatch_command(*, nodes: int, gpus_per_node: int, run_dir: Path, job_name: str,
                   train_args: list[str], time_limit: str | None = None,
                   partition: str | None = None, extra: list[str] = ()) -> list[str]:
    cmd = ["sbatch", f"--nodes={nodes}", "--ntasks-per-node=1", f"--job-name={job_name}",
           f"--output={run_dir / 'logs' / 'slurm-%j.out'}"]
    if gpus_per_node:
        cmd.append(f"--gpus-per-node={gpus_per_node}")
    if time_limit:
        cmd.append(f"--time={time_limit}")
    if partition:
        cmd.append(f"--partition={partition}")
    return [*cmd, *extra, str(SBATCH_SCRIPT), *train_args]


def _train_args(args: argparse.Namespace) -> list[str]:
    return ([] if args.config is None else ["--config", args.config]) + list(args.overrides)


def cmd_node(args: argparse.Namespace) -> int:
    launch = node_launch_from_env(os.environ)
    cmd = accelerate_command(launch, _train_args(args))
    shown = shlex.join(["accelerate", "launch", *cmd[3:]])
    if args.print:
        print(shown)
        return 0
    print(f"dist-train slurm: node {launch.node_rank}/{launch.num_nodes}, "
          f"{launch.processes_per_node} process(es) on {'GPU' if launch.uses_gpus else 'CPU'}, "
          f"main {launch.main_address}:{launch.main_port}\n  {shown}", file=sys.stderr, flush=True)
    os.execvpe(cmd[0], cmd, launch_environment(os.environ))


def cmd_run_dir(args: argparse.Namespace) -> int:
    print(run_dir_of(args.config, args.overrides))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    """Check the config, make RUN/logs, and sbatch slurm/train.sbatch with its logs there."""
    run_dir = run_dir_of(args.config, args.overrides)
    cmd = sbatch_command(nodes=args.nodes, gpus_per_node=args.gpus_per_node, run_dir=run_dir,
                         job_name=args.job_name or run_dir.name, train_args=_train_args(args),
                         time_limit=args.time, partition=args.partition,
                         extra=list(args.sbatch_arg or []))
    print(shlex.join(cmd))
    if args.dry_run:
        return 0
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ConfigError("sbatch not found: submit from a Slurm login node") from None
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    return done.returncode


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="experiment YAML")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=0, help="0: CPU nodes")
    parser.add_argument("--time", help="time limit, e.g. 24:00:00 (requeues before it)")
    parser.add_argument("--partition")
    parser.add_argument("--job-name", help="default: the run directory's name")
    parser.add_argument("--sbatch-arg", action="append", metavar="ARG",
                        help="passed to sbatch as is, e.g. --sbatch-arg=--account=vision")
    parser.add_argument("--dry-run", action="store_true", help="print the sbatch command only")
    add_train_arguments(parser)

