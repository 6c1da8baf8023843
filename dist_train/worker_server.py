"""Imported by the DataLoader workers' fork server (workers.py) before it forks any worker.

It loads the input pipeline, so that every worker starts with torch, torchvision, webdataset
and PIL already imported. And it sets the signals that the workers inherit (preemption.py):
- the stop signals are ignored (and unblocked: the server may start with them blocked,
  `workers.start_helpers`). Under Slurm every process of the job step receives SIGUSR1 or
  SIGTERM; the server must outlive it (it ends when its training process does), and a
  worker ignores it too until its `worker_init_fn` sets the worker's own handlers;
- SIGUSR2 prints the stacks, as in the training process.

Last it freezes what it has imported (`gc.freeze`): the collector of a worker then never scans
those objects, which a worker's first full collection did before its first batch (the delay:
benchmarks/RESULTS.md), nor touches their memory, which would copy pages the workers could share with the server.
"""

import gc
import signal

import dist_train.data.pipeline  # noqa: F401 - imported for the workers forked from here
from dist_train.preemption import SIGNALS, dump_stacks_on_request

for _sig in SIGNALS:
    signal.signal(_sig, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
dump_stacks_on_request()

gc.collect()
gc.freeze()
