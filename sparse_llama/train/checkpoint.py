"""Checkpoints of a training run in `<workdir>/checkpoints`, and stopping on SIGTERM.

One orbax `CheckpointManager` step directory holds four items:
  state  the TrainState (step, params, optimizer state, rng), sharded arrays via orbax
  data   each process's data-iterator state, `process_<i>-of-<n>.json` (exact resume)
  model  the LlamaConfig as JSON (a workdir refuses a run of another model)
  config the full run config as JSON (what produced the checkpoint)

Orbax writes a step into a temporary directory and renames it when every item is complete
(the rename is the commit), and in-progress or crashed writes are never listed as steps; the
leftover temporary directories are deleted when a manager next opens the workdir. Saves are
asynchronous: the arrays are copied off the devices before `save` returns, so the next
(donating) train step cannot change what is being written.
"""

import dataclasses
import json
import os
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from sparse_llama.model.config import LlamaConfig
from sparse_llama.train.state import TrainState

# LlamaConfig fields that change how the model runs, not what it is: may differ on resume.
EXECUTION_FIELDS = ("dtype", "scan_layers", "remat")
# Replicated arrays smaller than this are written whole by one replica. Orbax's default splits
# every replicated array across its replicas, which compiles one slicing program per shape:
# seconds of compile on the first save of a small model for no gain.
_MIN_REPLICA_PARALLEL_BYTES = 16 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    registry = ocp.type_handlers.create_type_handler_registry(*[
        (ty, ocp.type_handlers.get_type_handler(ty))
        for ty in ocp.type_handlers.supported_types() if ty is not jax.Array])
    registry.add(jax.Array, ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=_MIN_REPLICA_PARALLEL_BYTES))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


class DataStateHandler(ocp.CheckpointHandler):
    """Per-process JSON of a data iterator's `get_state()` (grain states are JSON-able dicts).

    Every process writes its own file, so the processes' shards resume independently; a
    restore with another process count is refused (the shards would not line up).
    """

    @staticmethod
    def _filename(directory: epath.Path) -> epath.Path:
        return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    def save(self, directory: epath.Path, args: "DataStateSave"):
        self._filename(directory).write_text(json.dumps(args.state))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
        path = self._filename(directory)
        if not path.exists():
            found = sorted(p.name for p in directory.iterdir())
            raise ValueError(f"no data-iterator state for this process ({path.name}) in "
                             f"{directory} (found {found}); resume with the process count the "
                             "run was checkpointed with")
        return json.loads(path.read_text())

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


def architecture(config: LlamaConfig) -> dict:
    """The fields that define the model's weights (JSON-able)."""
    d = dataclasses.asdict(config)
    return {k: v for k, v in d.items() if k not in EXECUTION_FIELDS}


def check_same_model(saved: dict, config: LlamaConfig, where: str) -> None:
    """Raise ValueError when a checkpoint's model differs from the one this run builds."""
    ours = architecture(config)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs run {ours[k]!r}"
             for k in ours if saved.get(k) != ours[k]]
    if diffs:
        raise ValueError(f"{where} holds a checkpoint of another model ({'; '.join(diffs)}); "
                         "use a new --workdir for this model, or the config that made it")


class Checkpoints:
    """Save and restore the run's checkpoints (all processes call every method together)."""

    def __init__(self, workdir: str, *, keep: int = 1, async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        if read_only and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"{workdir} has no checkpoints directory; train into it "
                                    "first (python -m launch.train --workdir=...)")
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(keep),
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only)
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        state_handler, data_handler = _state_handler(), DataStateHandler()
        for name, save, restore, handler in (
                ("state", ocp.args.PyTreeSave, ocp.args.PyTreeRestore, state_handler),
                ("data", DataStateSave, DataStateRestore, data_handler),
                ("model", ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler()),
                ("config", ocp.args.JsonSave, ocp.args.JsonRestore, ocp.JsonCheckpointHandler())):
            registry.add(name, save, handler)
            registry.add(name, restore, handler)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              handler_registry=registry)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def saved_model(self, step: int) -> dict:
        restored = self._manager.restore(step, args=ocp.args.Composite(model=ocp.args.JsonRestore()))
        return dict(restored["model"])

    def saved_config(self, step: int) -> dict:
        restored = self._manager.restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(restored["config"])

    def save(self, state: TrainState, data_state: Any, *, model: LlamaConfig,
             run_config: dict) -> bool:
        """Start saving `state` at its step; returns False when that step is already saved."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return False
        args = ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=DataStateSave(data_state),
            model=ocp.args.JsonSave(architecture(model)),
            config=ocp.args.JsonSave(run_config))
        return self._manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract: TrainState, *, model: LlamaConfig,
                with_data: bool = True) -> tuple[TrainState, Any]:
        """(state placed like `abstract`, the data-iterator state or None) of `step`."""
        where = os.path.join(self.directory, str(step))
        check_same_model(self.saved_model(step), model, where)
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                           dtype=a.dtype), abstract)
        items = {"state": ocp.args.PyTreeRestore(abstract, restore_args=restore_args)}
        if with_data:
            items["data"] = DataStateRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as err:
            if "data-iterator state" in str(err):
                raise
            raise ValueError(f"checkpoint {where} does not fit this run's training state "
                             f"(did the optimizer settings change?): {err}") from err
        state = restored["state"]
        if not isinstance(state, TrainState):
            state = TrainState(*state)
        return state, (restored["data"] if with_data else None)

    def wait(self) -> None:
        """Block until pending asynchronous saves are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


class StopRequest:
    """SIGTERM (preemption) asks the loop to checkpoint at the next step boundary and return.

    One process: a Python signal handler sets a flag. Several processes: JAX's preemption
    service (started by `jax.distributed.initialize`) catches SIGTERM and agrees on one step
    for all processes, so they save the same step together.
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        self._installed = False

    def __enter__(self) -> "StopRequest":
        if jax.process_count() == 1:
            try:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
                self._installed = True
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._flag = True

    def request(self) -> None:
        """Ask for a stop as SIGTERM would (tests, callers embedding the loop)."""
        self._flag = True

    def should_stop(self, step: int) -> bool:
        """Call at every step boundary (all processes, same step)."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            return self._flag or multihost_utils.reached_preemption_sync_point(step)
        return self._flag

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False
