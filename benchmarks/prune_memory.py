"""Peak host memory of layer-streamed pruning (`launch.prune`) against pruning in memory.

Run: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/prune_memory.py [--quick]

Makes a random Hugging Face Llama (default ~1.35B parameters, 5.4 GB of float32 safetensors,
written tensor by tensor so this process stays small), then prunes it twice, each in its own
subprocess whose peak resident memory (ru_maxrss from wait4) is measured:
  streamed:  `python -m launch.prune` (reads, prunes and writes one block at a time);
  reference: the whole model in memory: `hf_io.load_hf`, `driver.prune_model`,
             `sparse_export.save_sparse_hf`, with the same spec and calibration windows.
Both outputs are compared tensor by tensor (weights and the masks file): they must be equal
bit for bit. Target: the streamed peak below 40% of the model's float32 size.
The last stdout line is one JSON object:
  {"benchmark": "prune_memory", "rows": [{"model", "params", "f32_gb", "streamed_peak_gb",
   "reference_peak_gb", "streamed_fraction", "memory_ratio", "streamed_s", "reference_s",
   "outputs_equal", "speedup"} (+ "differing": the first tensors that are not equal)]}
memory_ratio = reference_peak / streamed_peak; speedup = reference_s / streamed_s.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from peak_report import emit

REPO = Path(__file__).resolve().parents[1]
# (hidden, intermediate, layers, heads, kv heads, vocab)
MODELS = {"1.35B": (2048, 5504, 24, 16, 16, 32000), "quick": (256, 688, 4, 4, 4, 4096)}


def make_model(directory: Path, dims) -> int:
    """A random Llama checkpoint (std 0.02, norms 1) written one tensor at a time; returns its
    parameter count."""
    from sparse_llama.model import hf_io
    from sparse_llama.model.config import LlamaConfig
    from sparse_llama.model.safetensors_stream import write_tensors

    hidden, inter, layers, heads, kv, vocab = dims
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_layers=layers, num_heads=heads, num_kv_heads=kv,
                         max_position_embeddings=4096)
    rng = np.random.default_rng(0)
    specs = hf_io.hf_tensor_specs(config, "float32")

    def tensors():
        for spec in specs:
            if spec.name.endswith("norm.weight"):
                yield spec.name, np.ones(spec.shape, np.float32)
            else:
                yield spec.name, rng.standard_normal(spec.shape, np.float32) * np.float32(0.02)

    directory.mkdir(parents=True)
    write_tensors(directory, specs, tensors(), max_shard_bytes=hf_io.DEFAULT_MAX_SHARD_BYTES,
                  metadata={"format": "pt"})
    hf_io.write_hf_metadata(config, directory, dtype="float32")
    return sum(int(np.prod(s.shape)) for s in specs)


def _measured(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS in GB, wall seconds, stdout) of one subprocess."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed with exit status {proc.returncode}")
    return usage.ru_maxrss * 1024 / 1e9, seconds, out


def _prune_flags(src, out, cal, method):
    return [f"--config.model.hf_path={src}", f"--config.output_dir={out}",
            f"--config.calibration.path={cal}", f"--config.pruning.method={method}",
            f"--config.calibration.num_samples={np.load(cal).shape[0]}",
            f"--config.calibration.seq_len={np.load(cal).shape[1]}"]


def reference(src: str, out: str, cal: str, method: str) -> None:
    """The in-memory prune (this file run with --reference): the whole model loaded."""
    from configs import prune as prune_configs
    from sparse_llama.commands import prune as prune_run
    from sparse_llama.model import hf_io
    from sparse_llama.pruning import driver
    from sparse_llama.sparse_io.sparse_export import save_sparse_hf
    from sparse_llama.sparsity.masks import masks_from_zeros

    config = prune_configs.get_config("sparsegpt50")
    config.pruning.method = method
    config.model.hf_path, config.output_dir, config.calibration.path = src, out, cal
    sections = prune_run.check_prune_config(config)  # the typed sections launch.prune reads
    model, params = hf_io.load_hf(src)
    windows = np.load(cal)
    spec = prune_run.prune_spec(sections, [0.5] * model.num_layers)
    # launch.prune's default keep_zeros: weights already exactly 0 stay pruned (a random
    # 1.35B float32 model has some: standard_normal rounds ~1 in 2^24 draws to 0).
    existing = masks_from_zeros(params) if sections.pruning.keep_zeros else None
    pruned, masks = driver.prune_model(params, model, windows, spec, masks=existing)
    del params
    save_sparse_hf(pruned, model, out, masks=masks, dtype="float32")


def _differing(a: Path, b: Path, prefix: str) -> list[str]:
    """Names of the tensors of `prefix`*.safetensors in `a` and `b` that differ (or exist in
    one only), read one at a time."""
    from safetensors import safe_open

    def tensors(d):
        out = {}
        for f in sorted(d.glob(f"{prefix}*.safetensors")):
            with safe_open(str(f), "numpy") as h:
                out.update(dict.fromkeys(h.keys(), f))
        return out

    ta, tb = tensors(a), tensors(b)
    differ = sorted(ta.keys() ^ tb.keys())
    for name in sorted(ta.keys() & tb.keys()):
        with safe_open(str(ta[name]), "numpy") as fa, safe_open(str(tb[name]), "numpy") as fb:
            if not np.array_equal(fa.get_tensor(name), fb.get_tensor(name)):
                differ.append(name)
    return differ


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 4-layer model (seconds)")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--workdir", default=None, help="scratch space (default: a temp dir)")
    parser.add_argument("--reference", nargs=4, metavar=("SRC", "OUT", "CAL", "METHOD"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference:
        reference(*args.reference)
        return
    name = "quick" if args.quick else "1.35B"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        n_params = make_model(root / "dense", MODELS[name])
        cal = root / "cal.npy"
        rng = np.random.default_rng(1)
        np.save(cal, rng.integers(0, MODELS[name][5], (args.samples, args.seq_len), np.int32))
        ours = _measured([sys.executable, "-m", "launch.prune", "--config=configs/prune.py",
                          *_prune_flags(root / "dense", root / "streamed", cal, args.method)])
        summary = json.loads(ours[2].strip().splitlines()[-1])
        ref = _measured([sys.executable, __file__, "--reference", str(root / "dense"),
                         str(root / "reference"), str(cal), args.method])
        differ = (_differing(root / "streamed", root / "reference", "model")
                  + _differing(root / "streamed" / "masks", root / "reference" / "masks",
                               "masks"))
    f32_gb = n_params * 4 / 1e9
    row = {"model": f"{name} random Llama", "params": n_params, "f32_gb": round(f32_gb, 3),
           "streamed_peak_gb": round(ours[0], 3), "reference_peak_gb": round(ref[0], 3),
           "streamed_fraction": round(ours[0] / f32_gb, 3),
           "memory_ratio": round(ref[0] / ours[0], 3), "streamed_s": round(ours[1], 1),
           "reference_s": round(ref[1], 1), "sparsity": summary["sparsity"],
           "outputs_equal": not differ, "speedup": round(ref[1] / ours[1], 3)}
    if differ:
        row["differing"] = differ[:6]
    emit("prune_memory", [row], list(row))


if __name__ == "__main__":
    main()
