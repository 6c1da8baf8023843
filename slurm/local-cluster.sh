#!/usr/bin/env bash
# A real Slurm cluster of 2 nodes on this one machine, for the tests and for trying the
# sbatch scripts: munged, slurmctld, and two slurmd (n1, n2) on distinct ports, all from
# Debian's packages (`apt-get install slurm-wlm munge`). Needs root (slurmd starts jobs).
#
#   slurm/local-cluster.sh start     # prints the SLURM_CONF line to export
#   export SLURM_CONF=/tmp/dist-train-slurm/slurm.conf
#   sbatch --nodes=2 slurm/train.sbatch --config configs/digits_cpu.yaml
#   slurm/local-cluster.sh stop
#
# Everything lives in $DIST_TRAIN_SLURM_DIR (default /tmp/dist-train-slurm): config, munge key
# and socket, state, logs. Nothing under /etc is touched, so it never clobbers a real install.
set -euo pipefail

dir="${DIST_TRAIN_SLURM_DIR:-/tmp/dist-train-slurm}"
conf="$dir/slurm.conf"
nodes=(n1 n2)
ctld_port="${DIST_TRAIN_SLURMCTLD_PORT:-16817}"
slurmd_ports=(16818 16819)
export SLURM_CONF="$conf"

log() { echo "local-cluster: $*" >&2; }

require() {
  local missing=()
  for cmd in munged slurmctld slurmd sinfo; do
    command -v "$cmd" >/dev/null || missing+=("$cmd")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    log "missing ${missing[*]}: install Debian's packages first: apt-get install slurm-wlm munge"
    exit 1
  fi
  if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (slurmd launches jobs as their users)"
    exit 1
  fi
}

write_config() {
  mkdir -p "$dir"/{state,log,run} "$dir"/spool/{n1,n2}
  # Each node gets the machine's real core count: two nodes share it, which Slurm allows
  # since neither knows of the other.
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 4 ))
  cat >"$conf" <<EOF
# Written by slurm/local-cluster.sh: two nodes on one machine.
ClusterName=dist-train-local
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s).
AuthInfo=socket=$dir/run/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
# Once its cred_expire is over, a requeued job waits for the next periodic scheduling pass
# (every 60 s by default, backfill's every 30 s): on this test cluster, every 2 s.
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait=60
MinJobAge=3600
InactiveLimit=0
NodeName=n1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=${slurmd_ports[0]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=${slurmd_ports[1]} CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
  if [ ! -s "$dir/munge.key" ]; then
    dd if=/dev/urandom of="$dir/munge.key" bs=1 count=1024 status=none
  fi
  chmod 700 "$dir"
  chmod 400 "$dir/munge.key"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

start() {
  require
  if running "$dir/run/slurmctld.pid"; then
    log "already running (SLURM_CONF=$conf)"
    echo "export SLURM_CONF=$conf"
    return 0
  fi
  write_config
  munged --force --key-file="$dir/munge.key" --socket="$dir/run/munge.socket" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/run/munged.seed"
  slurmctld -f "$conf" -i
  for node in "${nodes[@]}"; do
    slurmd -f "$conf" -N "$node"
  done
  # Ready when both nodes are idle: a job submitted earlier would wait for them.
  for _ in $(seq 60); do
    if [ "$(sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l)" -eq ${#nodes[@]} ]; then
      log "up: ${nodes[*]} idle (SLURM_CONF=$conf)"
      echo "export SLURM_CONF=$conf"
      return 0
    fi
    sleep 1
  done
  log "nodes did not come up; logs in $dir/log:"
  tail -n 20 "$dir"/log/*.log >&2 || true
  exit 1
}

stop() {
  for pidfile in "$dir"/run/slurmd-*.pid "$dir/run/slurmctld.pid" "$dir/run/munged.pid"; do
    if running "$pidfile"; then
      kill "$(cat "$pidfile")" || true
    fi
  done
  # slurmd takes its job steps' processes with it only at their end: wait for the daemons.
  for _ in $(seq 30); do
    alive=0
    for pidfile in "$dir"/run/*.pid; do
      running "$pidfile" && alive=1
    done
    [ $alive -eq 0 ] && break
    sleep 1
  done
  log "stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  status) SLURM_CONF="$conf" sinfo -N ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
