"""accelerate's per-step lookup of an optional package is made once, not on every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO

# Counts the sys.path searches (importlib.util.find_spec) made during 5 optimizer steps of an
# accelerate-prepared optimizer: as accelerate comes, then after make_accelerator.
STEPS = """
import importlib.util, json, torch
from accelerate import Accelerator

searches = 0
find_spec = importlib.util.find_spec
def counting_find_spec(*args, **kwargs):
    global searches
    searches += 1
    return find_spec(*args, **kwargs)
importlib.util.find_spec = counting_find_spec

def searches_in_5_steps(accelerator):
    global searches
    model = torch.nn.Linear(4, 2)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    def step():
        model(torch.rand(8, 4)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    step()  # the first step may look it up
    searches = 0
    for _ in range(5):
        step()
    return searches

as_shipped = searches_in_5_steps(Accelerator(cpu=True))
from dist_train.config import TrainConfig
from dist_train.runtime.accelerator import make_accelerator
print(json.dumps([as_shipped, searches_in_5_steps(make_accelerator(TrainConfig(cpu=True)))]))
"""


def test_the_optimizer_step_does_not_search_sys_path():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", STEPS], env=env, capture_output=True, text=True, check=True,
                         timeout=120)
    as_shipped, ours = json.loads(out.stdout.strip().splitlines()[-1])
    if as_shipped == 0:
        pytest.skip("this accelerate no longer searches sys.path per step: runtime/accelerate_patches.py can go")
    assert as_shipped == 10  # accelerate 1.15: two searches per step
    assert ours == 0
