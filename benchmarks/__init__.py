"""Standalone benchmarks (issue 7): each script measures one thing and prints one JSON line per result.

    python benchmarks/loader.py --smoke          # DALI loader vs a PyAV DataLoader baseline
    python benchmarks/train_step.py --smoke      # training step: precision, layout, fused optimizer, compile

Shared pieces: common.py (the result record, timing), pyav_baseline.py (MMAction2's CPU decoding pipeline).
Results and the commands that produced them are in docs/PERFORMANCE.md. Nothing here is imported by train.py.
"""
