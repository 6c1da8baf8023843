"""The training state: everything a resume restores, owned by one object.

`TrainState` holds the model, optimizer, schedule, grad scaler, data order, best-so-far and
the one step counter of the run: `step`, the optimizer steps taken. Epoch and step-in-epoch
are derived from it. Its members are `Stateful` (torchtitan's pattern, like torch's own
modules and optimizers): `state_dict()` gives a flat dict whose values are tensors or plain
JSON values, and `load_state_dict()` takes it back. checkpoint/resumable.py stores a member's
tensors as `<name>.safetensors` and the rest in `state.json` under its name: no pickle
anywhere. New state (EMA weights, a sampler's position) is one more entry in `members()`.

Most members are the same on every rank and saved once, by the main process; the random
number generators differ per rank and are saved by each (`rank_members()`).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from dist_train.data.order import OrderSpec
from dist_train.errors import CheckpointError
from dist_train.runtime.fsdp import full_state_dict, gathered, load_full_state_dict, sharded_like
from dist_train.training.best import BestSoFar

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dist_train.checkpoint.resumable import SavedState
    from dist_train.recipe.ema import WeightsEma
    from dist_train.recipe.optim import Schedule


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Launches:
    """How each launch of the run ran, from the step it started at: a resume on another number
    of processes changes the accumulation (dist_train/training/batch_layout.py)."""

    history: list[dict[str, Any]] = field(default_factory=list)

    def started(self, step: int, layout: dict[str, Any]) -> None:
        self.history.append({"step": step, **layout})

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state["history"])


class TrainState:
    def __init__(self, accelerator: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 schedule: Schedule, order: OrderSpec, steps_per_epoch: int, replica: torch.nn.Module | None = None):
        self.accelerator = accelerator
        self.model = model  # as prepared by accelerate (DDP-wrapped with several processes), or sharded (FSDP)
        # FSDP: an unsharded copy of the model that validation and best/ and last/ take the
        # gathered weights into (full_model): a sharded forward would need every rank to run
        # as many batches as the others, which a validation set's shares do not.
        self.replica = replica
        self._replica_step: int | None = None  # the step whose weights the replica holds
        self.optimizer = optimizer
        self.schedule = schedule
        self.order = order
        self.steps_per_epoch = steps_per_epoch
        self.step = 0  # optimizer steps taken: the run's one counter
        self.best = BestSoFar()
        self.launches = Launches()
        self.ema: WeightsEma | None = None  # the weights' moving average, with train.ema_decay

    @property
    def bare_model(self) -> torch.nn.Module:
        """The model without its DDP and torch.compile wrappers (accelerator.bare_model)."""
        from dist_train.runtime.accelerator import bare_model

        return bare_model(self.accelerator, self.model)

    def full_model(self) -> torch.nn.Module:
        """The model with all its weights on this rank: the bare model, or under FSDP the
        replica with the weights gathered into it (a collective: every rank calls it)."""
        if self.replica is None:
            return self.bare_model
        # Gathered once a step: validation, best/ and the resumable checkpoint of a step share it.
        if self._replica_step != self.step:
            self.replica.load_state_dict(full_state_dict(self.bare_model))
            self._replica_step = self.step
        return self.replica

    @property
    def epoch(self) -> int:
        """The epoch the next step belongs to."""
        return self.step // self.steps_per_epoch

    @property
    def step_in_epoch(self) -> int:
        return self.step % self.steps_per_epoch

    @property
    def epoch_of_last_step(self) -> int:
        """The epoch of the step last taken (the one just validated at an epoch's end)."""
        return max(self.step - 1, 0) // self.steps_per_epoch

    def members(self) -> dict[str, Stateful | None]:
        """What every rank holds alike, by the name it is saved under (None: not in this run)."""
        return {
            "model": _ModelWeights(self),
            "optimizer": _OptimizerState(self.optimizer),
            "scheduler": self.schedule,
            "scaler": self.accelerator.scaler,  # fp16 loss scaling only
            "position": _Position(self),
            "order": _FixedOrder(self.order),
            "best": self.best,
            "launches": self.launches,
            "ema": self.ema,
        }

    def rank_members(self) -> dict[str, Stateful]:
        """What differs per rank."""
        return {"rng": RandomStates()}

    def state_dict(self) -> dict[str, dict[str, Any] | None]:
        return {name: None if m is None else m.state_dict() for name, m in self.members().items()}

    def rank_state_dict(self) -> dict[str, dict[str, Any]]:
        return {name: m.state_dict() for name, m in self.rank_members().items()}

    def load_state_dict(self, state: dict[str, dict[str, Any] | None],
                        rank_state: dict[str, dict[str, Any]] | None = None) -> None:
        """Load every member the saved state holds; one it lacks keeps its fresh state (a
        grad scaler when an fp32 run resumes in fp16, a member newer than the checkpoint)."""
        for name, member in self.members().items():
            if member is not None and state.get(name) is not None:
                member.load_state_dict(state[name])
        for name, member in self.rank_members().items():
            if rank_state and name in rank_state:
                member.load_state_dict(rank_state[name])

    def resume_from(self, saved: SavedState) -> None:
        # Random states are per rank: they only mean something on the same number of ranks.
        same_ranks = saved.world_size == self.accelerator.num_processes
        self.load_state_dict(saved.members, saved.rank_members if same_ranks else None)


class _ModelWeights:
    def __init__(self, state: TrainState):
        self.state = state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's tensors, also when sharded (then a collective)."""
        return self.state.full_model().state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_full_state_dict(self.state.bare_model, state)  # sharded or not
        self.state._replica_step = None


GROUP = "group"  # the prefix of a parameter group's tensors in a flat optimizer state


class _OptimizerState:
    """An optimizer's state dict, flat: tensors as `<param index>.<name>` (a parameter group's own,
    such as timm LAMB's step count, as `group<i>.<name>`), the rest JSON. The tensors are whole
    under FSDP too (gathered from the shards, and sharded again on loading): one format for
    every parallelism and process count."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        full = self.optimizer.state_dict()
        flat: dict[str, Any] = {"param_groups": [], "scalars": {}}
        for i, group in enumerate(full["param_groups"]):
            flat["param_groups"].append({k: v for k, v in group.items() if not isinstance(v, torch.Tensor)})
            flat |= {f"{GROUP}{i}.{k}": v for k, v in group.items() if isinstance(v, torch.Tensor)}
        for index, values in full["state"].items():
            for name, value in values.items():
                if isinstance(value, torch.Tensor):
                    flat[f"{index}.{name}"] = gathered(value)
                else:
                    flat["scalars"].setdefault(str(index), {})[name] = value
        return flat

    def load_state_dict(self, flat: dict[str, Any]) -> None:
        state: dict[int, dict[str, Any]] = {}  # torch matches states to parameters by int index
        groups = [dict(group) for group in flat["param_groups"]]
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for key, value in flat.items():
            if isinstance(value, torch.Tensor):
                index, name = key.split(".", 1)
                if index.startswith(GROUP):
                    groups[int(index.removeprefix(GROUP))][name] = value
                else:  # a sharded parameter's moments: this rank's shard of them
                    param = params[int(index)] if int(index) < len(params) else None
                    state.setdefault(int(index), {})[name] = sharded_like(value, param)
        for index, values in flat["scalars"].items():
            state.setdefault(int(index), {}).update(values)
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})



class _Position:
    """Saved with epoch and step-in-epoch for a reader's sake; only the step is loaded."""

    def __init__(self, state: TrainState):
        self.state = state

    def state_dict(self) -> dict[str, int]:
        s = self.state
        return {"epoch": s.epoch, "step_in_epoch": s.step_in_epoch, "global_step": s.step}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.state.step = int(saved["global_step"])


class _FixedOrder:
    """The data order: read from the checkpoint before the run is built (it fixes the global
    batch), so loading only confirms it."""

    def __init__(self, order: OrderSpec):
        self.order = order

    def state_dict(self) -> dict[str, Any]:
        return asdict(self.order)

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if OrderSpec(**saved) != self.order:
            raise CheckpointError(f"the checkpoint's data order {saved} is not this run's {asdict(self.order)}")


class RandomStates:
    """Python's, NumPy's and torch's (CPU and CUDA) random states of this process."""

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        return {
            "python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
        np.random.set_state((state["numpy"][0], np.array(state["numpy"][1], dtype=np.uint32), *state["numpy"][2:]))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if torch.cuda.is_available() and state.get("cuda"):
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
