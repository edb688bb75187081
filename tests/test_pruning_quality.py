"""Pruning quality on a model the suite trains itself (`docs/algorithms.md`, "SparseGPT",
"Wanda", "Magnitude", "OWL").

A small Llama (preset mini: 4 layers, ~0.5M parameters) is trained on the embedded corpus, then
pruned at 50%, 2:4 and 70% with SparseGPT, Wanda and magnitude, and at 70% with the OWL
profile. The model the suite trains differs slightly between CPUs (summation order in XLA's
kernels), so only orderings whose margin is far beyond that noise are asserted:

- the layer reconstruction objective SparseGPT minimises, ||(W - W_hat) X||^2 on the trained
  block 0 with its real calibration inputs, for every linear and pattern: SparseGPT at least
  10% below both Wanda and magnitude (measured: 18% to 5x below);
- every pruned model is worse than the dense one, and at 2:4 SparseGPT beats magnitude
  (measured 4-13% apart across machines and training setups: the structured pattern hurts
  magnitude most);
- OWL's layer sparsities average S and order inversely to the measured outlier ratios.

Reported, not asserted (printed as JSON with `pytest -s`): the rest of the perplexity table.
At 50% and 70% the methods can lie within 0.1-2% of each other on this model, and the gaps
move by a few percent between machines (SparseGPT vs magnitude at 70%: 38.30 vs 38.26 on a
2-core Intel Xeon), so their order is not asserted. Measured on a 2-core AMD EPYC (dense
24.06): 50% SparseGPT 25.25, Wanda 26.56, magnitude 25.86; 2:4 26.55 / 29.62 / 29.99; 70%
32.90 / 37.29 / 36.04; 70% OWL SparseGPT 46.13, Wanda 60.31. OWL's gain comes from the outlier
features of large LLMs, which a 4-layer model trained for a minute does not have.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from configs import dense
from sparse_llama.commands import train as train_command
from sparse_llama.data import corpus
from sparse_llama.data.tokenizer import load_tokenizer
from sparse_llama.eval import perplexity
from sparse_llama.model import hf_io, llama
from sparse_llama.pruning import (
    calibration,
    driver,
    hessian,
    magnitude,
    methods,
    profiles,
    sparsegpt,
    wanda,
)

pytestmark = pytest.mark.slow

SEQ_LEN = 128


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quality")
    config = dense.get_config("tiny")
    config.model.preset = "mini"
    config.train.steps = 600
    config.train.eval_every = 600
    config.train.checkpoint_every = 600
    train_command.train(config, str(workdir))
    model_config, params = hf_io.load_hf(workdir / "hf")
    tokenizer = load_tokenizer(workdir / "hf")
    text = "\n\n".join(val[i] for name in ("prose", "code") for val in [corpus.split(name)[1]]
                       for i in range(min(len(val), 12)))
    windows = perplexity.token_windows(tokenizer.encode(text), SEQ_LEN)[:48]
    cal = calibration.calibration_windows("", tokenizer, num_samples=32, seq_len=SEQ_LEN,
                                          seed=0, vocab_size=model_config.vocab_size)
    return model_config, params, windows, cal


def _ppl(config, params, windows):
    return perplexity.evaluate_windows(params, config, windows, batch_size=16).perplexity


def _prune(config, params, cal, method, sparsities, n=0, m=0):
    spec = driver.PruneSpec(method=methods.get(method),
                            layer_sparsity=tuple(float(s) for s in sparsities), n=n, m=m,
                            batch_size=16)
    return driver.prune_model(params, config, cal, spec)[0]


PATTERNS = {"50%": (0.5, 0, 0), "2:4": (0.5, 2, 4), "70%": (0.7, 0, 0)}


def test_sparsegpt_minimises_the_layer_reconstruction_error(trained):
    """SparseGPT's own objective on trained weights and real inputs (block 0)."""
    config, params, _, cal = trained
    p = llama.layer_params(params, 0)
    x = llama.embed(params, jnp.asarray(cal), config)
    cos, sin, mask = llama.rope_and_mask(x.shape[:2], config)
    _, _, taps = llama.block_with_taps(p, x, cos, sin, mask, config)
    errors = {}
    for group, names in driver.GROUPS.items():
        inputs = taps[group].astype(jnp.float32)
        h = hessian.finalize(hessian.accumulate(hessian.init(inputs.shape[-1]), inputs))
        sq = hessian.finalize_sq_norms(
            hessian.accumulate_sq_norms(hessian.init_sq_norms(inputs.shape[-1]), inputs))
        flat = np.asarray(inputs, np.float64).reshape(-1, inputs.shape[-1])
        for name in names:
            w = np.asarray(driver._module_get(p, name)).T  # (out, in)
            for pattern, (s, n, m) in PATTERNS.items():
                pruned = {
                    "sparsegpt": sparsegpt.prune_layer(w, h, sparsity=s, n=n, m=m)[0],
                    "wanda": wanda.prune_layer(w, sq, sparsity=s, n=n, m=m)[0],
                    "magnitude": magnitude.prune_layer(w, sparsity=s, n=n, m=m)[0],
                }
                for method, w_new in pruned.items():
                    diff = np.asarray(w, np.float64) - np.asarray(w_new, np.float64)
                    errors[(name, pattern, method)] = float(np.sum((flat @ diff.T) ** 2))
    print(json.dumps({f"{k[0]} {k[1]} {k[2]}": v for k, v in errors.items()}, indent=1))
    for name in (n for names in driver.GROUPS.values() for n in names):
        for pattern in PATTERNS:
            e = {method: errors[(name, pattern, method)]
                 for method in ("sparsegpt", "wanda", "magnitude")}
            # Fails if the error compensation is lost or wrong (SparseGPT then scores like
            # magnitude per block); the measured margin is several-fold, not a float ulp.
            assert 1.1 * e["sparsegpt"] < min(e["wanda"], e["magnitude"]), (name, pattern, e)


def test_perplexity_table_and_owl(trained):
    config, params, windows, cal = trained
    dense_ppl = _ppl(config, params, windows)
    table = {}
    for pattern, (s, n, m) in PATTERNS.items():
        for method in ("sparsegpt", "wanda", "magnitude"):
            pruned = _prune(config, params, cal, method, (s,) * config.num_layers, n, m)
            table[(pattern, method)] = _ppl(config, pruned, windows)
    inputs = driver.embed_windows(params["embed_tokens"], cal, config, 16)
    ratios = driver.owl_outlier_ratios(driver.blocks_of(params), inputs, config, m=5.0)
    owl = profiles.owl(ratios, 0.7, 0.08)
    for method in ("sparsegpt", "wanda"):
        table[("70% OWL", method)] = _ppl(config, _prune(config, params, cal, method, owl),
                                          windows)
    print(json.dumps({"dense": dense_ppl, "owl_ratios": list(ratios),
                      "owl_sparsities": owl.tolist(),
                      **{f"{p} {m}": v for (p, m), v in table.items()}}, indent=1))
    for key, value in table.items():
        assert dense_ppl < value, key  # fails if pruning did nothing (or pruned the wrong tensors)
    # 2:4: measured 4-13% apart, beyond the ~2% the gaps move across CPUs. Fails if SparseGPT's
    # N:M selection or its error compensation breaks (it then scores like magnitude).
    assert table[("2:4", "sparsegpt")] < table[("2:4", "magnitude")]
    assert np.isclose(owl.mean(), 0.7)
    assert np.array_equal(np.argsort(ratios), np.argsort(-owl))  # more outliers, less pruning
