"""LORS, the ladder omission-rate schedule, and the unit counts each rung keeps.

With `train.steps = S`, `sat.lors.constant_fraction = c` and `sat.lors.rungs = n`:

    rung 0             steps [0, C)                 C = floor(c * S): the configured rates r
    rung j (1..n)      steps [C + (j-1) T // n, C + j T // n)   T = S - C: rates r * (n - j) / n

so the tail is n equal rungs (up to integer division of T) and the last rung is dense: it
holds the final step whatever T. A tail shorter than the rungs (T < n: the defaults 0.8 / 4
on fewer than 20 steps) leaves its first rungs empty and visits T of them, the dense one
last (10 steps: rungs 2 and 4). Each rung has its own static unit counts, hence its own
compiled step: at most n + 1 programs. `c = 1` keeps rung 0 (the rates) to the end. The rung
is a function of the step only, so a resumed run lands on the rung of its step.

Counts: a layer keeps `F - round(r_j * F)` MLP channels and `K - round(r_j * K)` KV groups
(round half up); at rung 0 the head rate must omit a whole number of groups (checked up front).
"""

import math
from typing import NamedTuple


def _round(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


class Ladder(NamedTuple):
    """The schedule: rung 0 for `constant_steps` updates, then `rungs` rungs over the rest."""

    mlp_rate: float
    head_rate: float
    constant_steps: int
    total_steps: int
    rungs: int

    @classmethod
    def make(cls, mlp_rate: float, head_rate: float, total_steps: int,
             constant_fraction: float, rungs: int) -> "Ladder":
        constant = total_steps if constant_fraction >= 1 else int(
            math.floor(constant_fraction * total_steps + 1e-9))
        return cls(float(mlp_rate), float(head_rate), constant, int(total_steps), int(rungs))

    @property
    def num_rungs(self) -> int:
        """Rungs the run can visit (compiled steps): rung 0 and the non-empty tail rungs
        (min(rungs, tail steps) of them), or 1 without a tail."""
        return 1 + min(self.rungs, self.total_steps - self.constant_steps)

    def rung(self, step: int) -> int:
        """The rung of update `step` (0-based, as `TrainState.step` before the update): the
        last rung whose interval (module docstring) starts at or before it."""
        step = int(step)
        tail = self.total_steps - self.constant_steps
        if step < self.constant_steps or tail <= 0:
            return 0
        # C + (j-1) T // n <= step  <=>  (j-1) T < (step - C + 1) n  <=>  j <= ceil(that / T)
        return min(self.rungs, -(-(step - self.constant_steps + 1) * self.rungs // tail))

    def rates(self, rung: int) -> tuple[float, float]:
        """(MLP rate, head rate) of a rung: the configured rates scaled by (n - j) / n."""
        if rung == 0:
            return self.mlp_rate, self.head_rate
        scale = (self.rungs - rung) / self.rungs
        return self.mlp_rate * scale, self.head_rate * scale

    def omission_rate(self, step: int) -> tuple[float, float]:
        """(MLP rate, head rate) of update `step`."""
        return self.rates(self.rung(step))


def kept_count(rate: float, units: int) -> int:
    """Units a layer keeps at omission rate `rate`: units - round(rate * units)."""
    return units - _round(rate * units)
