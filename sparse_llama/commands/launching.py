"""What every `launch/*.py` command shares: flags, the distributed runtime, user errors, the
JSON line.

A command is `launching.run_command(config_flag, run_fn)` (or `run_app(main)`, whose main calls
`launching.main(run_fn)`), where `run_fn` does the work through the library and returns a
JSON-serialisable summary dict. A user's mistake (a ValueError raised by validation) and any
OSError (a missing, unreadable or unwritable path, a full disk) are printed on one line to
stderr with exit status 2, never as a traceback; the OSError's line names its path(s). So are
the mistakes absl meets while it parses the flags, before the command starts (`parse_flags`):
an unknown flag, a bad value, an unknown config variant (the config file's own error), a
`--config.key` naming no key (with the nearest keys), a stray positional argument.
The summary is strict JSON: a non-finite number in it is such an error too, naming its key
(`None` is fine and prints as null), and then nothing is printed on stdout.
"""

import difflib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable
from typing import NoReturn

import jax
import ml_collections
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


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _flag_error(err: flags.Error) -> str:
    """absl's message on one line. ml_collections puts a config file's own error (an unknown
    variant) in it as a formatted traceback; the line takes that error's message instead."""
    message = str(err)
    if "\n" not in message:
        return message
    cause = err
    while cause is not None and "\n" in str(cause):  # the wrappers that carry the traceback
        cause = cause.__cause__ or cause.__context__
    head = message.splitlines()[0].removesuffix(" Error whilst parsing config file:")
    detail = error_message(cause) if cause is not None else message.strip().splitlines()[-1]
    return f"{head.rstrip(':')}: {detail}"


# Flag name -> the default config file of each `define_config` flag.
_CONFIG_FLAGS: dict[str, str] = {}


def _load_config(path: str) -> ml_collections.ConfigDict:
    """`get_config(variant)` of a `file.py[:variant]` path, as ml_collections calls it."""
    file, *variant = path.split(":", 1)
    spec = importlib.util.spec_from_file_location("_sparse_llama_flag_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*variant)


def _unknown_override(argv: list[str]) -> str | None:
    """The first `--config.a.b=value` of `argv` whose key is not in its config file, as one
    line naming the key, the nearest key and the section's keys; None if there is none."""
    for name, default in _CONFIG_FLAGS.items():
        path = default
        for i, arg in enumerate(argv):
            if arg.startswith(f"--{name}="):
                path = arg.split("=", 1)[1]
            elif arg == f"--{name}" and i + 1 < len(argv):
                path = argv[i + 1]
        config = None
        for arg in argv:
            if not arg.startswith(f"--{name}."):
                continue
            config = config if config is not None else _load_config(path)
            flag = arg.split("=", 1)[0]
            node, where = config, name
            for part in flag.split(".")[1:]:
                if not isinstance(node, ml_collections.ConfigDict):
                    return f"{flag}: {where} is a value, not a section; set --{where}=VALUE"
                if part not in node:
                    keys = sorted(node.keys())
                    near = difflib.get_close_matches(part, keys, n=1)
                    hint = f"; did you mean {near[0]!r}?" if near else ""
                    return (f"{flag}: {where} has no key {part!r}{hint} (its keys: "
                            f"{', '.join(keys)})")
                node, where = node[part], f"{where}.{part}"
    return None


def _exit_on_flag_mistake(parse: Callable, argv: list[str]):
    """`parse()`, with a mistake in the flags as one `error:` line and exit status 2 instead
    of absl's usage text or a traceback."""
    try:
        return parse()
    except flags.Error as err:
        _fail(_flag_error(err))
    except OSError as err:  # a config file that is not there
        _fail(error_message(err))
    except (AttributeError, KeyError):  # ml_collections: an override naming no config key
        message = _unknown_override(argv)
        if message is None:
            raise
        _fail(message)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (app.run's `flags_parser`); a mistake is one `error:` line."""
    rest = _exit_on_flag_mistake(lambda: flags.FLAGS(argv), argv)
    if len(rest) > 1:
        _fail(f"unexpected arguments {rest[1:]}; flags are --name=value "
              "(config overrides --config.key=value)")
    return rest


def run_app(main_fn: Callable[[list[str]], None]) -> None:
    """`app.run(main_fn)` with `parse_flags`: every launch command starts here."""
    app.run(main_fn, flags_parser=parse_flags)


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
        _fail(error_message(err))
    _print_line(line)


def define_config(default: str):
    """The `--config` flag: an ml-collections config file (`path.py:variant` allowed) whose
    values can be overridden with `--config.key=value`."""
    _CONFIG_FLAGS["config"] = default
    # Without --config on the command line, ml_collections loads the default file and applies
    # the --config.key overrides here, at definition.
    return _exit_on_flag_mistake(lambda: config_flags.DEFINE_config_file(
        "config", default, "Experiment config file (configs/*.py[:variant])."), sys.argv)


def run_command(config_flag, run_fn: Callable) -> None:
    """Run a command whose work is `run_fn(config) -> summary` (`run_app`, then `main`)."""
    run_app(lambda argv: main(lambda: run_fn(config_flag.value)))
