"""Pruning quality on a model the suite trains itself (REFERENCES.md sections 3 and 4).

A small Llama (preset mini: 4 layers) is trained on the embedded corpus, then pruned at 50%, 2:4 and 70% with SparseGPT,
Wanda and magnitude, and at 70% with the OWL profile. The published ordering asserted:
SparseGPT gives the lowest perplexity of the three methods at every pattern.

Reported, not asserted (printed as JSON with `pytest -s`): Wanda vs magnitude, which depends on
model size and outliers (at 7B Wanda wins), and OWL vs uniform at 70%. OWL's gain comes from
the outlier features of large LLMs; on this 4-layer model trained for a minute, measured
perplexities were OWL 38.6 vs uniform 37.9 (SparseGPT) and 43.3 vs 40.6 (Wanda), i.e. no gain,
with the OWL formula itself verified in test_pruning_driver.py. The test checks what OWL must
do on any model: the mean sparsity is S and more outliers get less pruning.
"""

import json

import numpy as np
import pytest

from configs import dense
from sparse_llama.data import corpus
from sparse_llama.data.tokenizer import load_tokenizer
from sparse_llama.eval import perplexity
from sparse_llama.model import hf_io
from sparse_llama.pruning import calibration, driver, profiles
from sparse_llama.train import loop

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
    loop.train(config, str(workdir))
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
    spec = driver.PruneSpec(method=method, layer_sparsity=tuple(float(s) for s in sparsities),
                            n=n, m=m, batch_size=16)
    return driver.prune_model(params, config, cal, spec)[0]


def test_sparsegpt_is_best_of_three_methods(trained):
    config, params, windows, cal = trained
    dense_ppl = _ppl(config, params, windows)
    uniform = {"50%": ((0.5,) * config.num_layers, 0, 0), "2:4": ((0.5,) * config.num_layers, 2, 4),
               "70%": ((0.7,) * config.num_layers, 0, 0)}
    table = {}
    for pattern, (sparsities, n, m) in uniform.items():
        for method in ("sparsegpt", "wanda", "magnitude"):
            pruned = _prune(config, params, cal, method, sparsities, n, m)
            table[(pattern, method)] = _ppl(config, pruned, windows)
    ratios = driver.owl_outlier_ratios(params, config, cal, m=5.0, batch_size=16)
    owl = profiles.owl(ratios, 0.7, 0.08)
    for method in ("sparsegpt", "wanda"):
        table[("70% OWL", method)] = _ppl(config, _prune(config, params, cal, method, owl),
                                          windows)
    print(json.dumps({"dense": dense_ppl, "owl_sparsities": owl.tolist(),
                      **{f"{p} {m}": v for (p, m), v in table.items()}}, indent=1))
    for pattern in uniform:
        assert dense_ppl < table[(pattern, "sparsegpt")]
        assert table[(pattern, "sparsegpt")] < table[(pattern, "wanda")], pattern
        assert table[(pattern, "sparsegpt")] < table[(pattern, "magnitude")], pattern
    assert np.isclose(owl.mean(), 0.7)
    assert np.array_equal(np.argsort(ratios), np.argsort(-owl))  # more outliers, less pruning
