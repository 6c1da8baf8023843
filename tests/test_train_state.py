"""TrainState through a resumable checkpoint and back: every member, no pickle, one process."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dist_train.checkpoint import load_model_checkpoint, load_resumable, save_resumable
from dist_train.config import SchedConfig, TrainConfig
from dist_train.data.order import OrderSpec
from dist_train.errors import CheckpointError
from dist_train.recipe.optim import Schedule
from dist_train.runtime.accelerator import make_accelerator
from dist_train.training.state import BestSoFar, TrainState

ORDER = OrderSpec(seed=3, global_batch=8, partitions=1, window=16)


def new_state(accelerator, seed: int) -> TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = Schedule(optimizer, SchedConfig(name="cosine", warmup_epochs=1), steps_per_epoch=5, epochs=3)
    model, optimizer = accelerator.prepare(model, optimizer)
    return TrainState(accelerator, model, optimizer, schedule, ORDER, steps_per_epoch=5)


def train(state: TrainState, steps: int) -> None:
    for _ in range(steps):
        loss = state.model(torch.randn(8, 4)).square().mean()
        loss.backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        state.schedule.after_optimizer_step()
        state.step += 1


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator(TrainConfig(cpu=True))


def test_every_member_comes_back(accelerator, tmp_path):
    saved = new_state(accelerator, seed=0)
    train(saved, 7)
    saved.best = BestSoFar(0.5, 1, {"val/acc": 0.5})
    saved.launches.started(0, {"world_size": 1, "grad_accum_steps": 1})
    path = save_resumable(accelerator, tmp_path, saved, meta={"note": "test"}, keep=2)
    random_draws = (random.random(), np.random.rand(), torch.rand(1))  # after the save

    assert path.name == "step-00000007"
    index = json.loads((path / "state.json").read_text())
    assert index["position"] == {"epoch": 1, "step_in_epoch": 2, "global_step": 7}
    assert sorted(index["files"]) == ["meta.json", "model.safetensors", "optimizer.safetensors",
                                      "rng-rank0.json"]
    weights, meta = load_model_checkpoint(path)  # also a model checkpoint
    assert meta["note"] == "test" and set(weights) == set(saved.model.state_dict())

    loaded = new_state(accelerator, seed=1)  # other initial weights
    loaded.resume_from(load_resumable(path, rank=0))
    assert loaded.step == 7 and (loaded.epoch, loaded.step_in_epoch, loaded.epoch_of_last_step) == (1, 2, 1)
    assert loaded.best == saved.best and loaded.launches.history == saved.launches.history
    for name, value in saved.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name
    for a, b in zip(saved.optimizer.state.values(), loaded.optimizer.state.values(), strict=True):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])
    assert loaded.schedule.lr == saved.schedule.lr and loaded.schedule.state_dict() == saved.schedule.state_dict()
    assert (random.random(), np.random.rand(), torch.rand(1)) == random_draws  # the random states too

    for state in (saved, loaded):  # on the same batches: momentum and schedule carry on alike
        torch.manual_seed(5)
        train(state, 3)
    for name, value in saved.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], value), name  # and they train alike


def test_a_member_the_checkpoint_lacks_keeps_its_fresh_state(accelerator, tmp_path):
    state = new_state(accelerator, seed=0)
    train(state, 2)
    path = save_resumable(accelerator, tmp_path, state, meta={}, keep=2)
    index = json.loads((path / "state.json").read_text())
    del index["launches"]  # as in a checkpoint from before launches were recorded
    (path / "state.json").write_text(json.dumps(index))
    loaded = new_state(accelerator, seed=1)
    loaded.resume_from(load_resumable(path, rank=0))
    assert loaded.step == 2 and loaded.launches.history == []


def test_a_checkpoint_of_another_order_is_refused(accelerator, tmp_path):
    path = save_resumable(accelerator, tmp_path, new_state(accelerator, seed=0), meta={}, keep=2)
    other = new_state(accelerator, seed=0)
    other.order = OrderSpec(seed=4, global_batch=8, partitions=1, window=16)
    with pytest.raises(CheckpointError, match="data order"):
        other.resume_from(load_resumable(path, rank=0))


@pytest.mark.parametrize(
    "damage",
    [
        lambda index: index.pop("position"),
        lambda index: index["order"].update(partitions=0),
        lambda index: index["order"].update(global_batch=7, partitions=2),
        lambda index: index["position"].update(global_step=-3),
        lambda index: index.update(world_size="two"),
        lambda index: index["best"].update(value="high"),
    ],
    ids=["no position", "zero partitions", "batch not a multiple of partitions", "negative step",
         "world size not a number", "best not a number"],
)
def test_a_damaged_state_falls_back_to_the_previous_checkpoint(accelerator, tmp_path, damage):
    from dist_train.checkpoint import find_resumable

    state = new_state(accelerator, seed=0)
    for _ in range(2):
        train(state, 2)
        save_resumable(accelerator, tmp_path, state, meta={}, keep=2)
    newest = tmp_path / "checkpoints" / "step-00000004"
    index = json.loads((newest / "state.json").read_text())
    damage(index)
    (newest / "state.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*step-00000004.*damaged or altered"):
        assert find_resumable(tmp_path) == tmp_path / "checkpoints" / "step-00000002"


def test_a_checkpoint_written_beside_training_holds_the_step_it_was_taken_at(accelerator, tmp_path,
                                                                              monkeypatch):
    """The writer's thread writes a snapshot: steps taken while it writes do not reach it, and
    it is a complete checkpoint (hashes pass, rotation done) once `wait` returns."""
    import threading

    from dist_train.checkpoint import find_resumable, resumable
    from dist_train.checkpoint.background import CheckpointWriter

    held = threading.Event()
    write_model_files = resumable.write_model_files

    def held_back(*args):  # the write starts only once training has taken two more steps
        assert held.wait(30)
        return write_model_files(*args)

    monkeypatch.setattr(resumable, "write_model_files", held_back)
    state = new_state(accelerator, seed=0)
    writer = CheckpointWriter()
    train(state, 3)
    at_save = {k: v.clone() for k, v in state.model.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in state.optimizer.state.values()]
    path = save_resumable(accelerator, tmp_path, state, meta={}, keep=1, writer=writer)
    assert not path.exists()  # not yet written: it does not count
    train(state, 2)  # every tensor the snapshot was taken of changes
    held.set()
    writer.wait()
    assert find_resumable(tmp_path) == path and path.name == "step-00000003"
    loaded = new_state(accelerator, seed=1)
    loaded.resume_from(load_resumable(path, rank=0))
    assert loaded.step == 3
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in at_save.items())
    assert all(torch.equal(s["momentum_buffer"], m) for s, m in zip(loaded.optimizer.state.values(), momentum,
                                                                      strict=True))
    path = save_resumable(accelerator, tmp_path, state, meta={}, keep=1, writer=writer)
    writer.close()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000005"]  # rotated


def test_a_background_write_that_fails_is_raised_where_the_run_waits_for_it(accelerator, tmp_path):
    from dist_train.checkpoint.background import CheckpointWriter

    def full_disk() -> None:
        raise CheckpointError("could not write checkpoint step-00000002: No space left on device")

    writer = CheckpointWriter()
    writer.submit(full_disk)
    with pytest.raises(CheckpointError, match="No space left on device"):
        writer.close()
