"""The one-shot pruning methods by name (`pruning.method`): the registry above the method files.

Each method file defines its `Method` record (pruning/method.py: the statistic it needs, its
solver, its own hyper-parameters). A new method is one new file, one line in the table below
and a variant in configs/prune.py (with its own `pruning.*` keys, if it has any).
"""

from sparse_llama.pruning import magnitude, sparsegpt, wanda
from sparse_llama.pruning.method import Method

METHODS: dict[str, Method] = {method.name: method for method in (
    sparsegpt.METHOD,
    wanda.METHOD,
    magnitude.METHOD,
)}


def get(name: str) -> Method:
    """The record of `pruning.method=name` (ValueError naming the methods for another name)."""
    if name not in METHODS:
        raise ValueError(f"pruning.method={name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]
