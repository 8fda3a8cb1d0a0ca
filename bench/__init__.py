"""Measurements on real checkpoints and books. Run each as a module from the repository root:
`python -m bench.replicate`, `python -m bench.compare`, ..."""
