"""DALI video pipelines: MMAction2-exact frame sampling and augmentation, decoded on the GPU (NVDEC) or the CPU.

    from dali_pipes.loader import VideoLoader

Modules: lists (list files, class names), probe (frame counts and seek points, cached), sampling (SampleFrames),
geometry (resize sizes, crop boxes), segments (cut the GOPs a clip needs), pipelines (the DALI graphs),
loader (batches as torch tensors, sharding, epochs). Only loader and pipelines import DALI.
"""
