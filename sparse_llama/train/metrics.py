"""What a run reports: a progress bar, TensorBoard events, `metrics.jsonl`, a start-up summary.

Only process 0 writes. Every record is one JSON object per line in `<workdir>/metrics.jsonl`
(`{"step": ..., "kind": "train" | "eval", ...}`) and the same scalars as TensorBoard events in
`<workdir>/tensorboard`. A resumed run appends; records of steps that were redone after a
restart appear twice, the later one is the one that counts.
"""

import json
import math
import os
import time

import jax
from absl import logging

from sparse_llama.model.config import LlamaConfig, param_count


class RunMetrics:
    """Progress bar plus metric sinks for one run segment (start_step .. total_steps)."""

    def __init__(self, workdir: str, *, total_steps: int, start_step: int,
                 tokens_per_step: int, progress: bool = True):
        self.primary = jax.process_index() == 0
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self._bar = None
        self._jsonl = None
        self._tb = None
        self._last_time = None
        self._last_step = start_step
        self._timed_steps = 0
        self._timed_seconds = 0.0
        self._paused_at = None
        if not self.primary:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")  # noqa: SIM115
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, smoothing=0.1)

    def start_timing(self, step: int) -> None:
        """Throughput counts from here (call after the first, compiling, step)."""
        self._last_time = time.perf_counter()
        self._last_step = step

    def tokens_per_s(self) -> float:
        """Mean batch tokens (padding included) per second over the timed steps."""
        if self._timed_seconds <= 0:
            return float("nan")
        return self._timed_steps * self.tokens_per_step / self._timed_seconds

    def _write(self, step: int, kind: str, values: dict) -> None:
        record = {"step": step, "kind": kind, **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            if math.isfinite(float(value)):
                self._tb.add_scalar(f"{kind}/{name}", float(value), step)
        self._tb.flush()

    def train(self, step: int, values: dict) -> dict:
        """Record train metrics at `step`; adds tokens_per_s over the steps since last call."""
        now = time.perf_counter()
        values = dict(values)
        if self._last_time is not None and step > self._last_step:
            seconds = now - self._last_time
            self._timed_steps += step - self._last_step
            self._timed_seconds += seconds
            values["tokens_per_s"] = (step - self._last_step) * self.tokens_per_step / seconds
            self._last_time, self._last_step = now, step
        if not self.primary:
            return values
        self._write(step, "train", values)
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix(loss=f"{values['loss']:.4f}",
                                  tok_s=f"{values.get('tokens_per_s', float('nan')):.0f}",
                                  refresh=False)
            self._bar.refresh()
        return values

    def eval(self, step: int, values: dict) -> None:
        if self.primary:
            self._write(step, "eval", values)
            message = " ".join(f"{k}={float(v):.4f}" for k, v in values.items())
            (self._bar.write if self._bar is not None else logging.info)(
                f"step {step}: eval {message}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._jsonl is not None:
            self._jsonl.close()

    def pause(self) -> None:
        """Exclude the time until the next `resume` (evaluation, checkpoint waits)."""
        if self._last_time is not None and self._paused_at is None:
            self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._last_time is not None and self._paused_at is not None:
            self._last_time += time.perf_counter() - self._paused_at
            self._paused_at = None


def startup_summary(config: LlamaConfig, *, mesh, data_cfg, train_cfg, start_step: int,
                    tokens_per_step: int, source: str) -> str:
    """A few lines about the run, logged once before the first step."""
    n = param_count(config)
    mesh_shape = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    sources = dict(data_cfg.sources) if data_cfg.sources else {}
    if data_cfg.path:
        mixture = f"text at {data_cfg.path}"
    elif sources:
        mixture = ", ".join(f"{k} (weight {v.get('weight', 1.0)})" for k, v in sources.items())
    else:
        mixture = "embedded default corpus"
    steps_left = train_cfg.steps - start_step
    lines = [
        f"model: {source}, {n / 1e6:.2f}M params, d={config.hidden_size}, "
        f"layers={config.num_layers}, vocab={config.vocab_size}, compute {config.dtype}",
        f"mesh: {mesh_shape} over {jax.device_count()} devices in {jax.process_count()} "
        f"process(es)",
        f"data: {mixture}; seq_len={data_cfg.seq_len}, batch={train_cfg.batch_size} "
        f"({tokens_per_step} tokens/step), grad_accum={train_cfg.grad_accum}",
        f"steps: {start_step} -> {train_cfg.steps} ({steps_left} to go, "
        f"{steps_left * tokens_per_step / 1e6:.2f}M tokens)"
        + (f", resuming from step {start_step}" if start_step else ""),
    ]
    return "\n".join(lines)
