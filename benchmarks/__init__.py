"""The benchmark scripts, also importable as `hae_fx.benchmarks` so that `hae-fx bench accuracy|speed` finds them
in an installed package (`package-dir` maps this folder, as it maps `passes/` and `models/`).

`accuracy` and `speed` are the two the command line runs; each also runs as `python benchmarks/<name>.py`. The
GPU scripts (`gpu_*.py`, `quant_speed.py`) import their siblings by file name and run as scripts only.
"""
