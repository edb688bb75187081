"""The persistent compilation cache the commands turn on, and the compile-time clock."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from sparse_llama.ground.compilation import CompileClock


def test_the_clock_counts_compiles_and_not_cached_calls():
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + jnp.cos(x).sum())
    x = jnp.arange(7.0)
    with CompileClock() as clock:
        f(x).block_until_ready()
    first = clock.seconds
    with CompileClock() as again:
        f(x).block_until_ready()  # the same shapes: no compile
    assert first > 0 and again.seconds == 0.0


def test_commands_fill_the_cache_a_second_process_reads(tmp_path):
    script = ("from sparse_llama.ground.compilation import enable_persistent_cache\n"
              "import jax, jax.numpy as jnp\n"
              "hits = []\n"
              "jax.monitoring.register_event_listener(\n"
              "    lambda e, **k: hits.append(e) if e.endswith('cache_hits') else None)\n"
              "print(enable_persistent_cache())\n"
              "jax.jit(lambda x: jnp.tanh(x) @ x.T)(jnp.ones((8, 8))).block_until_ready()\n"
              "print(len(hits))\n")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                           text=True, timeout=120) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert runs[0].stdout.splitlines()[0] == str(tmp_path / "xla")
    assert os.listdir(tmp_path / "xla")  # the first process wrote its program
    # The second process loaded the program from the cache instead of compiling it.
    assert int(runs[0].stdout.splitlines()[1]) == 0
    assert int(runs[1].stdout.splitlines()[1]) >= 1
    off = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**env, "SPARSE_LLAMA_COMPILE_CACHE": "0"}, timeout=120)
    assert off.stdout.splitlines()[0] == "None"
