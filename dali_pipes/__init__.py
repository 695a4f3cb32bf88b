"""DALI video pipelines: MMAction2-exact frame sampling and augmentation, decoded on the GPU (NVDEC) or the CPU."""
