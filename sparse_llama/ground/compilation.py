"""XLA compilation across runs: the persistent cache every command turns on, and a clock of
the compile time a piece of work spent (so a command reports compile and compute apart).

The cache lives in `$JAX_COMPILATION_CACHE_DIR` when set, else `<cache>/xla` (`<cache>` is
`$SPARSE_LLAMA_CACHE` or ~/.cache/sparse_llama, as for the token cache); `SPARSE_LLAMA_COMPILE_CACHE=0`
turns it off. A second `launch.prune` of a model of the same shapes then loads its solvers
instead of compiling them.
"""

import contextlib
import os

import jax
from jax import monitoring

from sparse_llama.ground.cache import cache_dir

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def enable_persistent_cache() -> str | None:
    """Point JAX's persistent compilation cache at the project's cache (the directory, or
    None when turned off)."""
    if os.environ.get("SPARSE_LLAMA_COMPILE_CACHE", "1") == "0":
        return None
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if not path:
        path = str(cache_dir() / "xla")
    jax.config.update("jax_compilation_cache_dir", path)
    # Every program: the many small ones (slicing a layer out of the stack, scatters) add up
    # to seconds per command on a CPU, and a lookup costs less than their compile.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


class CompileClock:
    """Seconds spent in XLA backend compiles while the clock runs (`with clock: ...`)."""

    def __init__(self):
        self.seconds = 0.0
        self._running = False

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        del kwargs
        if self._running and event == _COMPILE_EVENT:
            self.seconds += duration

    def __enter__(self) -> "CompileClock":
        self._running = True
        monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        self._running = False
        with contextlib.suppress(Exception):  # older jax: listeners cannot be removed
            monitoring.unregister_event_duration_listener(self._listen)
