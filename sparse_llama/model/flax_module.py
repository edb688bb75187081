"""The Llama as a `flax.linen` Module, for code built on Flax: the same pure functions inside.

    module = LlamaModule(config)
    variables = module.init(key, tokens)            # {"params": llama.init_params(key, config)}
    logits = module.apply(variables, tokens, masks=masks)   # == llama.forward(params, tokens,
                                                            #      config, masks)

The params collection is exactly our params tree (one Flax param per top-level entry:
`embed_tokens`, `layers`, `norm`, `lm_head`), so params loaded with `hf_io.load_hf`, pruned,
or restored from a training checkpoint go into `apply` as `{"params": params}`, and Flax
params come back out of `init` ready for every function of this package. There is no second
copy of the math: `__call__` is `llama.forward`.

Initialisation: `init(key, ...)` gives the values `llama.init_params(key, config)` gives, so a
model is the same whichever API made it. Flax hands each `self.param` initialiser its own key
folded from the module path; to reproduce `init_params(key)` the module instead draws the whole
tree once from its scope's 'params' key (the key passed to `init` itself for a top-level module,
Flax's path-folded key when nested) and each top-level param takes its slice.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from sparse_llama.model import llama
from sparse_llama.model.config import LlamaConfig


class LlamaModule(nn.Module):
    """`llama.forward` as a Flax Module; see the module docstring.

    config: the architecture and execution settings (hashable, static).
    param_dtype / init_std: as in `llama.init_params`.
    """

    config: LlamaConfig
    param_dtype: Any = jnp.float32
    init_std: float = 0.02

    def _scope_key(self) -> jax.Array:
        # The scope's own 'params' key, without Flax's per-call counter folded in: for a
        # top-level module this is the key given to `init`.
        return self.scope.rngs["params"].as_jax_rng()

    @nn.compact
    def __call__(self, tokens: Int[Array, "b t"], masks=None, *,
                 positions: Int[Array, "b t"] | None = None,
                 segment_ids: Int[Array, "b t"] | None = None) -> Float[Array, "b t v"]:
        """Logits (float32, (b, t, V)): `llama.forward(params, tokens, config, masks, ...)`."""
        drawn: dict = {}

        def init_entry(key, name):
            # Flax calls this once per entry at init (with its own key, unused: the tree is
            # drawn once from the scope key), and under eval_shape at apply to check shapes.
            if self.is_initializing():
                if not drawn:
                    drawn.update(llama.init_params(self._scope_key(), self.config,
                                                   self.param_dtype, self.init_std))
                return drawn[name]
            return llama.init_params(key, self.config, self.param_dtype, self.init_std)[name]

        params = {name: self.param(name, init_entry, name)
                  for name in llama.param_shapes(self.config)}
        return llama.forward(params, tokens, self.config, masks, positions=positions,
                             segment_ids=segment_ids)
