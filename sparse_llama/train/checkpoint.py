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

A committed step can still be damaged later (a truncated copy, a disk error, a deleted file).
`restore_latest` then falls back to the newest intact step, warning with the bad step's number
and moving it aside to `<workdir>/checkpoints_damaged/` (its number would otherwise block the
re-save of that step). A restore that fails because the saved state has another structure
(the optimizer settings changed) is not damage and is reported as such.
"""

import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from sparse_llama.model.config import LlamaConfig
from sparse_llama.train.state import TrainState

# LlamaConfig fields that change how the model runs, not what it is: may differ on resume.
EXECUTION_FIELDS = ("dtype", "scan_layers", "remat", "attention")
# Replicated arrays smaller than this are written whole by one replica. Orbax's default splits
# every replicated array across its replicas, which compiles one slicing program per shape:
# seconds of compile on the first save of a small model for no gain.
_MIN_REPLICA_PARALLEL_BYTES = 16 << 20


class DamagedCheckpointError(ValueError):
    """A committed step that cannot be read back (files truncated, missing or corrupt)."""

    def __init__(self, step: int, where: str, cause: BaseException):
        self.step = step
        super().__init__(f"checkpoint step {step} in {where} is damaged: "
                         f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}")  # one line


def _is_aborted_read_callback(unraisable) -> bool:
    """An aborted asynchronous restore's late callback: tensorstore finishing a read after the
    asyncio loop orbax ran it on was closed by the failure (`call_soon_threadsafe` on a closed
    loop). Nothing is lost; the restore already failed and was reported."""
    if unraisable.exc_type is not RuntimeError or "Event loop is closed" not in str(
            unraisable.exc_value):
        return False
    tb = unraisable.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def _silence_aborted_reads() -> None:
    """Drop the aborted reads' "Event loop is closed" reports (one per array still in flight:
    dozens of tracebacks that look like a crash) for the rest of the process; every other
    unraisable exception still reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_aborted_reads", False):
        return

    def hook(unraisable):
        if not _is_aborted_read_callback(unraisable):
            previous(unraisable)

    hook._drops_aborted_reads = True
    sys.unraisablehook = hook


class DataStateMismatchError(ValueError):
    """The data-iterator state of this process is absent (another process count)."""


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
            raise DataStateMismatchError(
                f"no data-iterator state for this process ({path.name}) in {directory} (found "
                f"{found}); resume with the process count the run was checkpointed with")
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


def _leaf_shapes(tree) -> dict[tuple, tuple]:
    """{path: shape} of a tree's array leaves; paths as plain names, so a NamedTuple saved as a
    dict and a tuple saved as a list compare equal."""
    def name(key):
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                return getattr(key, attr)
        return str(key)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves
            if hasattr(leaf, "shape")}


def _restore_struct(meta, sh) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=sh)


def _children(node):
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, list | tuple):
        return list(enumerate(node))
    return []


def _find_masks(tree, params) -> tuple | None:
    """The key path of the keep-sparse `masks` in a saved optimizer state's metadata (a dict
    entry named "masks" with the params' structure), or None for a dense run."""
    def same(a, b):
        return jax.tree.structure(a) == jax.tree.structure(b)

    for key, child in _children(tree):
        if key == "masks" and same(child, params):
            return (key,)
        found = _find_masks(child, params)
        if found is not None:
            return (key, *found)
    return None


def _at(tree, path: tuple):
    for key in path:
        tree = tree[key]
    return tree


def _sparse_item(tree, path: tuple, leaf):
    """`tree`'s containers along `path` only, with `leaf` at its end: the partial-restore
    target of one subtree (list entries off the path are None)."""
    if not path:
        return leaf
    key, rest = path[0], path[1:]
    if isinstance(tree, dict):
        return {key: _sparse_item(tree[key], rest, leaf)}
    return [(_sparse_item(child, rest, leaf) if i == key else None)
            for i, child in enumerate(tree)]


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
        self._read_only = read_only

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

    def _saved_state_fits(self, step: int, abstract: TrainState) -> bool | None:
        """Whether the saved state has `abstract`'s leaves (paths, shapes); None: unreadable."""
        try:
            saved = self._manager.item_metadata(step)["state"]
            saved = saved.tree if hasattr(saved, "tree") else saved
            theirs = _leaf_shapes(saved)
        except Exception:  # any failure to read the metadata is damage
            return None
        if not theirs:  # orbax gives None when the state's _METADATA file is gone
            return None
        return theirs == _leaf_shapes(abstract)

    def restore(self, step: int, abstract: TrainState, *, model: LlamaConfig,
                with_data: bool = True) -> tuple[TrainState, Any]:
        """(state placed like `abstract`, the data-iterator state or None) of `step`.

        Raises ValueError when the step holds another model or a state of another structure
        (changed optimizer settings), DataStateMismatchError for another process count, and
        DamagedCheckpointError when its files cannot be read back.
        """
        where = os.path.join(self.directory, str(step))
        try:
            saved_model = self.saved_model(step)
        except Exception as err:  # a JSON item that cannot be read back
            raise DamagedCheckpointError(step, self.directory, err) from err
        check_same_model(saved_model, model, where)
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                           dtype=a.dtype), abstract)
        items = {"state": ocp.args.PyTreeRestore(abstract, restore_args=restore_args)}
        if with_data:
            items["data"] = DataStateRestore()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except DataStateMismatchError:
            raise
        except Exception as err:  # classified below, never swallowed
            # The metadata tells a structure change (the optimizer's) from damaged files.
            if self._saved_state_fits(step, abstract) is False:
                raise ValueError(f"checkpoint {where} does not fit this run's training state "
                                 f"(did the optimizer settings change?): {err}") from err
            raise DamagedCheckpointError(step, self.directory, err) from err
        state = restored["state"]
        if not isinstance(state, TrainState):
            state = TrainState(*state)
        return state, (restored["data"] if with_data else None)

    def restore_model_arrays(self, step: int, param_shardings, *, model: LlamaConfig
                             ) -> tuple[int, dict, dict | None]:
        """(step, params, keep-sparse masks or None) of `step`, read alone (orbax partial
        restore), whatever optimizer wrapped them: exporting a run needs neither its moments
        nor the objective that built its optimizer (SAT, distillation)."""
        where = os.path.join(self.directory, str(step))
        try:
            saved_model = self.saved_model(step)
            saved = self._manager.item_metadata(step)["state"]
            saved = saved.tree if hasattr(saved, "tree") else saved
        except Exception as err:  # unreadable JSON or metadata
            raise DamagedCheckpointError(step, self.directory, err) from err
        check_same_model(saved_model, model, where)
        if not saved or "params" not in saved:
            raise DamagedCheckpointError(step, self.directory,
                                         ValueError("no params in the saved state's metadata"))
        params_sh = param_shardings
        replicated = jax.tree.leaves(params_sh)[0].mesh
        replicated = jax.sharding.NamedSharding(replicated, jax.sharding.PartitionSpec())
        item = {"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
                "params": jax.tree.map(_restore_struct, saved["params"], params_sh)}
        where_masks = _find_masks(saved["opt_state"], saved["params"])
        if where_masks is not None:
            masks_meta = _at(saved["opt_state"], where_masks)
            mask_sh = jax.tree.map(
                lambda m, sh: sh if len(m.shape) else replicated, masks_meta, params_sh)
            item["opt_state"] = _sparse_item(saved["opt_state"], where_masks,
                                             jax.tree.map(_restore_struct, masks_meta, mask_sh))
        restore_args = jax.tree.map(
            lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                           dtype=a.dtype), item)
        state_args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                            partial_restore=True)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=state_args))
        except Exception as err:
            raise DamagedCheckpointError(step, self.directory, err) from err
        got = restored["state"]
        masks = _at(got["opt_state"], where_masks) if where_masks is not None else None
        return int(jax.device_get(got["step"])), got["params"], masks

    def restore_latest(self, abstract: TrainState, *, model: LlamaConfig,
                       with_data: bool = True) -> tuple[TrainState, Any] | None:
        """Restore the newest intact step: (state, data state or None), or None if none saved.

        A damaged step is skipped with a warning naming it; unless the manager is read-only,
        it is moved to `<workdir>/checkpoints_damaged/` once an older step restores, so the
        run can save that step number again. Every step damaged: ValueError naming them (they
        are left where they are). Another model, another optimizer structure or another
        process count raise at once: those are not damage, and an older step would not help.
        """
        return self._newest_intact(
            lambda step: self.restore(step, abstract, model=model, with_data=with_data))

    def restore_model_arrays_latest(self, param_shardings, *, model: LlamaConfig
                                    ) -> tuple[int, dict, dict | None]:
        """`restore_model_arrays` of the newest intact step (damaged ones skipped as in
        `restore_latest`); FileNotFoundError when nothing is saved."""
        found = self._newest_intact(
            lambda step: self.restore_model_arrays(step, param_shardings, model=model))
        if found is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}; train first")
        return found

    def _newest_intact(self, restore):
        """`restore(step)` of the newest step it reads; see restore_latest."""
        # Before the first try: an aborted read's callback can fire while orbax is still
        # unwinding the failed restore, before the error reaches this loop.
        _silence_aborted_reads()
        damaged: list[DamagedCheckpointError] = []
        for step in sorted(self.all_steps(), reverse=True):
            try:
                restored = restore(step)
            except DamagedCheckpointError as err:
                damaged.append(err)
                continue
            if damaged:
                moved = self._set_aside([err.step for err in damaged])
                # One line for the whole fallback: what was damaged, why, where it went.
                logging.warning("%s; using checkpoint step %d instead%s",
                                "; ".join(str(err) for err in damaged), step,
                                f" (the damaged step moved to {moved})" if moved else "")
            return restored
        if damaged:
            raise ValueError(f"every checkpoint in {self.directory} is damaged ("
                             + "; ".join(str(err) for err in damaged)
                             + "); move them away to start the run afresh")
        return None

    def _set_aside(self, steps: list[int]) -> str | None:
        """Move damaged step directories out of the manager's sight (process 0 renames);
        where they went (None when read-only: nothing is moved)."""
        if self._read_only:
            return None
        aside = os.path.join(os.path.dirname(self.directory), "checkpoints_damaged")
        if jax.process_index() == 0:
            os.makedirs(aside, exist_ok=True)
            for step in steps:
                target = os.path.join(aside, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
                os.rename(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("sparse_llama_set_aside_damaged")
        self._manager.reload()
        return aside

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
