"""Plan a training run's memory per device from the compiler, without running it.

    python -m launch.plan --config=configs/sparse70.py --num_devices=8 --device_memory_gb=80

`--num_devices=N` (N >= 1; default: all of this machine's): plan on N devices: the real ones
when this machine has N, else N fake CPU devices (the step is only lowered and compiled, nothing
is allocated). Any training config or recipe, with its `--config.key=value` overrides
(sparse_llama/commands/plan.py).
Last stdout line: the plan as JSON, with `peak_bytes_per_device` and, with
`--device_memory_gb`, `fits` (and `fits_with` when it does not).
"""

import os
import sys


def _requested_devices(argv) -> int | None:
    """--num_devices from the command line, read before jax starts (it fixes the device count
    of the CPU platform once); None when absent or not a count (the flag refuses it)."""
    for i, arg in enumerate(argv):
        value = (arg.split("=", 1)[1] if arg.startswith("--num_devices=") else
                 argv[i + 1] if arg == "--num_devices" and i + 1 < len(argv) else None)
        if value is not None:
            return int(value) if value.isdigit() else None
    return None


_N = _requested_devices(sys.argv)
if _N:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={_N}").strip()

import jax  # noqa: E402  (after XLA_FLAGS: the device count is fixed when jax starts)
from absl import flags  # noqa: E402

from sparse_llama.commands import launching, plan  # noqa: E402

_CONFIG = launching.define_config("configs/dense.py")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices to plan for (default: all).",
                                    lower_bound=1)
_MEMORY = flags.DEFINE_float("device_memory_gb", None, "Memory of one device in GB (10^9 B).")


def _plan(config) -> dict:
    n = jax.device_count() if _NUM_DEVICES.value is None else _NUM_DEVICES.value
    devices = jax.devices() if jax.device_count() >= n else jax.devices("cpu")
    if len(devices) < n:
        raise ValueError(f"--num_devices={n}: only {len(devices)} devices could be made")
    result = plan.plan(config, devices[:n], _MEMORY.value)
    print(plan.format_plan(result), flush=True)
    return result


if __name__ == "__main__":
    launching.run_command(_CONFIG, _plan)
