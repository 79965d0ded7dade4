"""Ahead-of-time compilation for TPU slices on a CPU: `python -m cvt_flax.aot` (see `__main__`).

`tpus`: slice names, libtpu topologies and the chips' public figures; `compile`: the trainer's run
and steps compiled for a slice; `report`: HBM, fit, roofline; `hlo`: collectives and top costs
read from the compiled HLO.
"""
