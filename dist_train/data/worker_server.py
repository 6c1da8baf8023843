"""Imported by an exec'd fork server of the DataLoader workers (workers.py) before it forks any worker.

It loads the input pipeline, so that every worker starts with torch, torchvision, webdataset
and PIL already imported, then sets the server up as `workers.prepare_server` says (a server
forked from the training process has the pipeline already and calls that itself).
"""

import dist_train.data.pipeline  # noqa: F401 - imported for the workers forked from here
from dist_train.data.workers import prepare_server

prepare_server()
