"""Running one model over several processes: tensor parallelism.

    tp.py        the split (DTensor ColwiseParallel/RowwiseParallel over a DeviceMesh), load_tp, sampling on rank 0
    slices.py    each rank's slices read from HF, Meta or GGUF checkpoints, never the whole tensor
    lockstep.py  keeping the ranks' forwards together: same code on every rank, or rank 0's engine steps mirrored
    launch.py    `--tp N` for the commands under torchrun (docs/parallel.md)
"""
