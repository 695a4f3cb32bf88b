#!/usr/bin/env bash
# Our loader against MMAction2 1.2.0 itself on a CPU (issues 12.5, 14.2): one quiet run, one file of JSON records.
#
#     make peer-venv                      # once: MMAction2's own environment, .peer-venv
#     benchmarks/cpu_peer_suite.sh        # -> work_dirs/cpu_peer_suite.jsonl, then a summary table
#     OUT=/tmp/peer.jsonl STEPS=3 benchmarks/cpu_peer_suite.sh     # a short trial
#     PEER_DECODERS="decord pyav" benchmarks/cpu_peer_suite.sh     # the PyAV peer as well (about twice as long)
#
# What runs: benchmarks/loader.py on VP9 340x256 K400-like clips (16 clips of 300 frames, GOP 128 and GOP 16,
# generated once under DATA_DIR), both recipes (k400_8x8x1, k400_32x2x1), train (batch 8, the configs') and 10x3
# test (batch 1 video of 30 views), ours with the configs' loader defaults against the peer
# (benchmarks/mmaction2_peer.py: MMAction2's pipeline in mmengine's DataLoader, 2 workers, decord unless
# PEER_DECODERS says otherwise). Records: one JSON line per variant, in loader.py's format; the goals read from them:
#   - ours_train clips/s >= 1.2x the decord peer, both GOPs, both recipes     (ours_train `ratio_to_peer`)
#   - ours_test videos/s >= 1x the decord peer, both GOPs, both recipes       (ours_test `ratio_to_peer`)
#   - k400_32x2x1 ours_test >= 40% of k400_8x8x1's rate, same set             (its `ratio_to_recipe`)
# Extra arguments go to loader.py (e.g. --torch-threads 2). Run time on 2 idle cores, from the CPU time per clip
# of a STEPS=3 trial (2026-11-29, 2-core CPU dev machine): about 15 min with the loader of that day, whose 32x2x1 10x3
# test costs 0.5 s of CPU per view (about 6 min of the 15); about 8 min once it costs what 8x8x1's does per frame.
# Clip sets not yet made add a few minutes once. PEER_DECODERS="decord pyav" adds about half again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEER=${PEER:-.peer-venv/bin/python}
OUT=${OUT:-work_dirs/cpu_peer_suite.jsonl}
STEPS=${STEPS:-16}
WARMUP=${WARMUP:-4}  # 2 x the peer's workers: its DataLoader's start-up prefetch is used before the clock starts
PEER_DECODERS=${PEER_DECODERS:-decord}
DATA_DIR=${DATA_DIR:-/tmp/r2plus1d_bench}
if [ ! -x "$PEER" ]; then
    echo "error: $PEER: no MMAction2 environment (run \`make peer-venv\`, or set PEER=/path/to/its/python)" >&2
    exit 1
fi
mkdir -p "$(dirname "$OUT")"
# shellcheck disable=SC2086  # PEER_DECODERS is a list of words
"$PY" benchmarks/loader.py --device cpu --codec vp9 --gops 128 16 --num-videos 16 --frames 300 \
    --data-dir "$DATA_DIR" --config k400_8x8x1.yaml k400_32x2x1.yaml \
    --variants ours_train ours_test peer_train peer_test --peer "$PEER" --peer-decoders $PEER_DECODERS \
    --workers 2 --warmup "$WARMUP" --steps "$STEPS" "$@" > "$OUT"
"$PY" - "$OUT" <<'EOF'
import json
import sys

print(f"{'gop':>4} {'recipe':<12} {'variant':<22} {'clips/s':>8} {'videos/s':>8} {'load':>5}  ratios")
for line in open(sys.argv[1]):
    r = json.loads(line)
    ratios = {key: r[key] for key in ("ratio_to_peer", "ratio_to_recipe") if r.get(key)}
    print(f"{r.get('gop')!s:>4} {r['recipe']:<12} {r['variant']:<22} {r['clips_per_s']!s:>8} "
          f"{r.get('videos_per_s')!s:>8} {r.get('load_avg_1m')!s:>5}  {json.dumps(ratios) if ratios else ''}")
print(f"records: {sys.argv[1]}")
EOF
