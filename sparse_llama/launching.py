"""What every `launch/*.py` command shares: the distributed runtime, user errors, the JSON line.

A command is `launching.main(run_fn)` where `run_fn()` does the work through the library and
returns a JSON-serialisable summary dict. A user's mistake (a ValueError or missing file raised
by validation) is printed on one line to stderr with exit status 2, never as a traceback.
"""

import json
import os
import sys
from collections.abc import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0 for multi-process runs (or set JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes in a multi-process run (JAX_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in a multi-process run (JAX_PROCESS_ID).")

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FileExistsError)

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


def print_summary(summary: dict) -> None:
    """The command's last stdout line: one JSON object (process 0 only)."""
    if jax.process_index() == 0:
        sys.stdout.flush()
        print(json.dumps(summary, default=float), flush=True)


def main(run_fn: Callable[[], dict]) -> None:
    """Run a command: distributed init, the work, the JSON line; one-line user errors."""
    if not flags.FLAGS["verbosity"].present:
        # orbax and jax log every save at INFO; a command's own output is its progress bars.
        logging.set_verbosity(logging.WARNING)
    try:
        init_distributed()
        summary = run_fn()
    except USER_ERRORS as err:
        logging.debug("user error", exc_info=True)
        message = str(err).strip().replace("\n", " ")
        if isinstance(err, FileNotFoundError) and err.filename and err.filename not in message:
            message = f"{message}: {err.filename}"
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
    print_summary(summary)


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
