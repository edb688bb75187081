"""The pallas_call shapes both matmul kernels share: an (M, N) output in (bm, bn) tiles, a
GPU grid with the K loop inside the program, a TPU grid with the K steps last and an f32
VMEM accumulator."""

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton


def pad_rows(x: jax.Array, block_m: int) -> tuple[jax.Array, int]:
    """x with its rows zero-padded to a multiple of block_m, and the padded row count."""
    m = x.shape[0]
    mp = -(-m // block_m) * block_m
    return jnp.pad(x, ((0, mp - m),) + ((0, 0),) * (x.ndim - 1)), mp


def gpu_call(kernel, *, in_specs, out_rows: int, out_cols: int, dtype, block_m: int,
             block_n: int, interpret: bool, name: str):
    """Triton: grid (M / bm, N / bn); programs run in parallel, the kernel loops over K."""
    return pl.pallas_call(
        kernel,
        grid=(out_rows // block_m, out_cols // block_n),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((out_rows, out_cols), dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name=name,
    )


def tpu_call(kernel, *, steps: int, in_specs, out_rows: int, out_cols: int, dtype,
             block_m: int, block_n: int, interpret: bool, name: str):
    """Mosaic: grid (M / bm, N / bn, steps), the reduction axis last and sequential; the
    kernel takes an f32 (bm, bn) VMEM accumulator after its output (see `tpu_accumulate`)."""
    return pl.pallas_call(
        kernel,
        grid=(out_rows // block_m, out_cols // block_n, steps),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j, k: (i, j)),
        out_shape=jax.ShapeDtypeStruct((out_rows, out_cols), dtype),
        scratch_shapes=[pltpu.VMEM((block_m, block_n), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=name,
    )


def tpu_accumulate(o_ref, acc_ref, contribution) -> None:
    """acc += contribution() over the K steps; the output is written at the last step."""
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    acc_ref[...] += contribution()

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = acc_ref[...].astype(o_ref.dtype)
