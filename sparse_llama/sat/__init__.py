"""Sparsity-accelerated training (SAT, arXiv 2406.01392): per-step unit scores, selection,
the ladder omission-rate schedule and the objective that trains only the kept units.
See docs/sat.md."""
