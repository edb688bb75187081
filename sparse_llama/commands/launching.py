"""What every `launch/*.py` command shares: the distributed runtime, user errors, the JSON line.

A command is `launching.main(run_fn)` where `run_fn()` does the work through the library and
returns a JSON-serialisable summary dict. A user's mistake (a ValueError raised by validation)
and any OSError (a missing, unreadable or unwritable path, a full disk) are printed on one line
to stderr with exit status 2, never as a traceback; the OSError's line names its path(s).
The summary is strict JSON: a non-finite number in it is such an error too, naming its key
(`None` is fine and prints as null), and then nothing is printed on stdout.
"""

import json
import math
import os
import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sparse_llama.ground.compilation import enable_persistent_cache

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-process runs (or set JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes in a multi-process run (JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in a multi-process run (JAX_PROCESS_ID).")

# OSError covers FileNotFoundError, PermissionError, IsADirectoryError, ENOSPC, ...: all are
# about the paths a user gave or the disk they point at, and the line names the path.
USER_ERRORS = (ValueError, OSError)

# Cluster environments in which jax.distributed.initialize() finds its own arguments.
_AUTODETECT_ENV = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def init_distributed() -> None:
    """Start JAX's distributed runtime when this job runs as several processes.

    Explicit flags or JAX_* variables win; otherwise a multi-task SLURM/Open MPI job or a
    multi-host TPU slice is auto-detected. A single process does nothing.
    """
    address = _COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        num = _NUM_PROCESSES.value or int(os.environ.get("JAX_NUM_PROCESSES", "0")) or None
        pid = _PROCESS_ID.value
        if pid is None and "JAX_PROCESS_ID" in os.environ:
            pid = int(os.environ["JAX_PROCESS_ID"])
        if num is None or pid is None:
            raise ValueError("a multi-process run needs --num_processes and --process_id "
                             "(or JAX_NUM_PROCESSES and JAX_PROCESS_ID) with the coordinator")
        jax.distributed.initialize(address, num_processes=num, process_id=pid)
        return
    for var in _AUTODETECT_ENV:
        value = os.environ.get(var, "")
        many = len(value.split(",")) > 1 if var == "TPU_WORKER_HOSTNAMES" else (
            value.isdigit() and int(value) > 1)
        if many:
            jax.distributed.initialize()
            return


def _json_value(value):
    """numpy / jax scalars as Python numbers (json.dumps' `default` hook)."""
    import numpy as np

    array = np.asarray(value)
    if array.ndim != 0:
        raise TypeError(f"a summary value must be a scalar, got shape {array.shape}")
    return array.item()


def _non_finite(value, key: str):
    """(key, value) of the first non-finite float in a summary value (nested), else None."""
    if isinstance(value, dict):
        for k, v in value.items():
            found = _non_finite(v, f"{key}.{k}" if key else str(k))
            if found:
                return found
        return None
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _non_finite(v, f"{key}[{i}]")
            if found:
                return found
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    return None


def summary_line(summary: dict) -> str:
    """The summary as one strict-JSON line; ValueError naming the key of a NaN or infinity.

    `json.dumps` would write them as bare `NaN` / `Infinity`, which no JSON parser accepts.
    """
    # Round-trip numpy/jax scalars to Python numbers first, so the check sees every number.
    plain = json.loads(json.dumps(summary, default=_json_value))
    bad = _non_finite(plain, "")
    if bad:
        key, value = bad
        raise ValueError(f"the run's result {key!r} is {value}, not a finite number; no "
                         "summary is printed (see the messages above for where it went wrong)")
    return json.dumps(plain, allow_nan=False)


def _print_line(line: str) -> None:
    if jax.process_index() == 0:
        sys.stdout.flush()
        print(line, flush=True)


def print_summary(summary: dict) -> None:
    """The command's last stdout line: one JSON object (process 0 only); see summary_line."""
    _print_line(summary_line(summary))


def error_message(err: BaseException) -> str:
    """One line for a user error; an OSError's line names the path(s) it is about."""
    if isinstance(err, OSError) and (err.filename is not None or err.filename2 is not None):
        message = str(err.strerror or err).strip()
        paths = [str(p) for p in (err.filename, err.filename2) if p is not None]
        missing = [p for p in paths if p not in message]
        if missing:
            message = f"{message}: {' -> '.join(missing)}"
    else:
        message = str(err).strip() or type(err).__name__
    return message.replace("\n", " ")


def main(run_fn: Callable[[], dict]) -> None:
    """Run a command: distributed init, the work, the JSON line; one-line user errors."""
    if not flags.FLAGS["verbosity"].present:
        # orbax and jax log every save at INFO; a command's own output is its progress bars.
        logging.set_verbosity(logging.WARNING)
    try:
        init_distributed()
        enable_persistent_cache()
        # Checked inside the try: a NaN result is reported like any other error.
        line = summary_line(run_fn())
    except USER_ERRORS as err:
        logging.debug("user error", exc_info=True)
        print(f"error: {error_message(err)}", file=sys.stderr, flush=True)
        sys.exit(2)
    _print_line(line)


def define_config(default: str):
    """The `--config` flag: an ml-collections config file (`path.py:variant` allowed) whose
    values can be overridden with `--config.key=value`."""
    return config_flags.DEFINE_config_file(
        "config", default, "Experiment config file (configs/*.py[:variant]).")


def run_command(config_flag, run_fn: Callable) -> None:
    """`app.run` a command whose work is `run_fn(config) -> summary`."""
    def _main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.key=value")
        main(lambda: run_fn(config_flag.value))
    app.run(_main)
