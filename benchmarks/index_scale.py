"""The video index at Kinetics scale: start-up, memory, source payload and file size with 240k and 700k videos.

    python benchmarks/index_scale.py                          # 240k and 700k, a few minutes on 2 cores
    python benchmarks/index_scale.py --sizes 20000 --clips 2  # smoke size

A few real 340x256, 300-frame VP9 clips are made and probed (`--clips`; kept in --data-dir for reruns). A synthetic
list of N videos is then made from them: 700 file names (hard links to the clips) under 1000 class folders
(symlinks to one folder), so every one of the N paths is distinct and opens a real file, and the index of that list
is written from the real clips' entries (index.write_index copying their rows; no probe of N files). For each N,
in a fresh process each (the index's pages warm in the page cache, as for every rank but the first one to read it):
- `warm_start`: seconds to open the index as a rank that did not probe (runtime's path), build a train VideoLoader
  of shard 1 of 8 (its spec: index path and per-run numbers) and compute its first batch's source columns
  (BatchSource: frame numbers, GOP cuts read from the files, crop boxes), after the imports;
- `memory`: after the first batch, `anonymous_mb`: the growth of the process's anonymous memory since before the
  index was opened (/proc/self/smaps_rollup; memory of its own: arrays derived from the index, the epoch's order,
  the batch's bytes), `index_mapped_mb`: the index file's pages mapped into it (/proc/self/smaps; page cache,
  shared by every process of the machine that maps the file), and `rss_mb`: the growth of its resident set;
- `source_payload`: bytes of the pickled BatchSource DALI sends each source worker;
- `index_file`: the index's size in bytes, and the seconds its synthetic write took.
`cold_probe` (once): ms per video to probe the real clips and write their index (this code, index.prepare_index on
a fresh index), against the probe plus the version-3 JSON cache write the code before it did (the same probe
results dumped as that file's entries), same run.
- `gpu_routing_plan`: seconds of nvdec.plan_decoding over every usable video (what a GPU rank adds at start-up).
- `start_checks`: seconds of train.py's list check before it touches the work dir, from the current index
  (`index_s`, index.check_list) and by parsing the list (`parse_s`, what a list changed since its index costs).
`cut` (once): ms per GOP cut, block parse against packet table, on the real clips.
One JSON line per measurement (stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
import types
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dali_pipes.index import Lines, ListMeta, index_file, prepare_index, write_index  # noqa: E402
from dali_pipes.probe import file_stat, probe_video  # noqa: E402

BENCHMARK = "index_scale"
NUM_CLASSES = 400
FILES_PER_FOLDER = 700
FOLDERS = 1000
WORLD_SIZE, SHARD = 8, 1
BATCH = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[240_000, 700_000], help="videos per synthetic list")
    parser.add_argument("--clips", type=int, default=3, help="real 340x256 300-frame VP9 clips to probe")
    parser.add_argument("--data-dir", default="/tmp/index_scale", help="where the clips, lists and indexes go")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic lists and indexes")
    parser.add_argument("--measure", nargs=2, metavar=("LIST", "ROOT"), help=argparse.SUPPRESS)  # child process
    return parser.parse_args(argv)


def record(variant: str, **figures) -> None:
    print(json.dumps({"benchmark": BENCHMARK, "variant": variant, "load_avg_1m": round(os.getloadavg()[0], 2),
                      "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                      **figures}), flush=True)


def make_clips(folder: Path, count: int) -> list[Path]:
    from tools.make_synthetic import k400like_frames, write_video

    folder.mkdir(parents=True, exist_ok=True)
    clips = []
    for k in range(count):
        path = folder / f"clip{k}.webm"
        if not path.exists():
            write_video(path, k400like_frames(np.random.default_rng(k), 300, 256, 340), codec="vp9")
        clips.append(path)
    return clips


def cold_probe(clips: list[Path], work: Path) -> None:
    """ms per video: probe + index write (this code) against probe + version-3 JSON cache write (the code before)."""
    lst = work / "cold_list.txt"
    lst.write_text("".join(f"{clip} {k}\n" for k, clip in enumerate(clips)))
    repeats = 3
    after, before = [], []
    for _ in range(repeats):
        index_file(lst).unlink(missing_ok=True)
        start = time.perf_counter()
        prepare_index(str(lst), "", NUM_CLASSES, index_file(lst), num_workers=1)
        after.append((time.perf_counter() - start) * 1e3 / len(clips))
        start = time.perf_counter()
        entries = {}
        for clip in clips:
            info = probe_video(clip)
            entries[str(clip)] = {"stat": list(file_stat(str(clip))), "info": asdict(info)}
        (work / "cold_cache.json").write_text(json.dumps({"version": 3, "videos": entries}))  # not the list's name
        before.append((time.perf_counter() - start) * 1e3 / len(clips))
    record("cold_probe", videos=len(clips), repeats=repeats, index_ms_per_video=round(float(np.median(after)), 2),
           json_cache_ms_per_video=round(float(np.median(before)), 2))


def cut_cost(clips: list[Path]) -> None:
    """ms per GOP cut (segments.read_segment) of the 8x8 train clips' frame spans: by parsing the blocks between
    two keyframes (what the index keeps for WebM) against the per-packet table (what it kept before)."""
    from dali_pipes.segments import read_segment

    rng = np.random.default_rng(0)
    infos = [probe_video(clip) for clip in clips]
    spans = [(k % len(clips), int(rng.integers(0, 300 - 57))) for k in range(200)]
    times = {}
    for way in ("blocks", "table"):
        use = [info if way == "blocks" else replace(info, blocks=()) for info in infos]
        start = time.perf_counter()
        for k, first in spans:
            read_segment(clips[k], use[k], first, first + 56, file_stat(str(clips[k])))
        times[way] = (time.perf_counter() - start) * 1e3 / len(spans)
    record("cut", cuts=len(spans), blocks_ms=round(times["blocks"], 3), table_ms=round(times["table"], 3),
           keyframes_per_video=[len(i.keyframes) for i in infos])


def synthetic_list(work: Path, clips: list[Path], count: int) -> tuple[Path, Path, list[str]]:
    """A list of `count` distinct real paths (module docstring) and its root."""
    root = work / f"kinetics_{count}"
    files = root / "files"
    if root.exists():
        shutil.rmtree(root)
    files.mkdir(parents=True)
    rng = np.random.default_rng(0)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_"))
    names = []
    for j in range(FILES_PER_FOLDER):  # Kinetics-style names: YouTube id, start and end second
        name = f"{''.join(rng.choice(alphabet, 11))}_{j:06d}_{j + 10:06d}.webm"
        os.link(clips[j % len(clips)], files / name)
        names.append(name)
    folders = []
    for k in range((count + FILES_PER_FOLDER - 1) // FILES_PER_FOLDER):
        folder = f"class_{k % NUM_CLASSES:03d}_part_{k:04d}"
        (root / folder).symlink_to("files", target_is_directory=True)
        folders.append(folder)
    paths = [str(root / folders[i // FILES_PER_FOLDER] / names[i % FILES_PER_FOLDER]) for i in range(count)]
    list_file = work / f"list_{count}.txt"
    list_file.write_text("".join(f"{p[len(str(root)) + 1:]} {i % NUM_CLASSES}\n" for i, p in enumerate(paths)))
    return list_file, root, paths


def build(work: Path, clips: list[Path], count: int) -> tuple[Path, Path]:
    small_list = work / "clips_list.txt"
    small_list.write_text("".join(f"{clip} 0\n" for clip in clips))
    small = prepare_index(str(small_list), "", NUM_CLASSES, index_file(small_list), num_workers=1)
    list_file, root, paths = synthetic_list(work, clips, count)
    source = np.array([(i % FILES_PER_FOLDER) % len(clips) for i in range(count)], np.int64)
    stats = np.array([small.stat(int(r)) for r in source[:FILES_PER_FOLDER]], np.int64)
    stats = stats[np.arange(count) % FILES_PER_FOLDER]
    lines = Lines(np.arange(count, dtype=np.int32), (np.arange(count) % NUM_CLASSES).astype(np.int32),
                  np.full(count, -1, np.int32))
    start = time.perf_counter()
    write_index(index_file(list_file), ListMeta.of(list_file, str(root)), paths, stats, lines, {}, small, source)
    seconds = time.perf_counter() - start
    record("index_file", videos=count, bytes=index_file(list_file).stat().st_size,
           mb=round(index_file(list_file).stat().st_size / 2**20, 1), write_s=round(seconds, 2),
           clips=len(clips), packet_table_bytes_per_video=int(len(small.packet_blob) / len(small)))
    return list_file, root


def rollup() -> dict[str, float]:
    """Selected /proc/self/smaps_rollup fields, MB."""
    fields = {}
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    return fields


def mapping_rss(path: Path) -> dict[str, float]:
    """Rss and Private_Clean (MB) of this process's mappings of `path` (/proc/self/smaps)."""
    totals, inside = {"Rss": 0.0, "Private_Clean": 0.0, "Shared_Clean": 0.0}, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and len(fields) >= 5 and not fields[0].endswith(":"):
            inside = len(fields) >= 6 and fields[5] == str(path)
        elif inside and fields and fields[0].rstrip(":") in totals:
            totals[fields[0].rstrip(":")] += int(fields[1]) / 1024
    return totals


def measure(list_file: str, root: str) -> None:
    """The child process: one rank's warm start-up, memory and payload (module docstring)."""
    import torch  # noqa: F401  (imported before the clock, as train.py has it)

    from config import DataConfig
    from dali_pipes.index import check_list
    from dali_pipes.lists import read_video_list
    from dali_pipes.loader import BatchSource, PathSequence, VideoLoader, open_list_index
    from dali_pipes.nvdec import plan_decoding
    from dali_pipes.probe import CPU_CODECS

    cfg = DataConfig(root=root, train_list=list_file, clip_len=8, frame_interval=8, short_side=256, train_crop=224,
                     num_threads=2)
    before = rollup()
    start = time.perf_counter()
    index = open_list_index(list_file, root, NUM_CLASSES, "", probe=False)
    opened = time.perf_counter()
    loader = VideoLoader(cfg, "train", BATCH, NUM_CLASSES, shard_id=SHARD, num_shards=WORLD_SIZE, index=index)
    built = time.perf_counter()
    source = BatchSource(loader.spec, 0, 0, videos=loader.videos)
    columns = source(types.SimpleNamespace(epoch_idx=0, iteration=0))
    done = time.perf_counter()
    after = rollup()
    videos = len(loader.records)
    record("warm_start", videos=videos, seconds=round(done - start, 3), open_s=round(opened - start, 3),
           loader_s=round(built - opened, 3), first_batch_s=round(done - built, 3), batch=BATCH,
           encoded_bytes=int(sum(c.nbytes for c in columns[0])), shard=f"{SHARD}/{WORLD_SIZE}")
    mapped = mapping_rss(Path(index.path).resolve())
    record("memory", videos=videos, anonymous_mb=round(after["Anonymous"] - before["Anonymous"], 1),
           index_mapped_mb=round(mapped["Rss"], 1), index_file_mb=round(Path(index.path).stat().st_size / 2**20, 1),
           rss_mb=round(after["Rss"] - before["Rss"], 1))
    payload = pickle.dumps(BatchSource(loader.spec, 0, 0, videos=loader.videos))
    record("source_payload", videos=videos, bytes=len(payload))
    # What a GPU rank adds to its start-up: NVDEC's plan for every usable video (a CPU computation, measured here
    # for a Hopper GPU, compute capability 9.0, with data.decode_device=auto).
    start = time.perf_counter()
    on_cpu, _ = plan_decoding(PathSequence(loader.videos), loader.videos.decoder_fields(), "auto", (9, 0),
                              CPU_CODECS)
    record("gpu_routing_plan", videos=videos, seconds=round(time.perf_counter() - start, 3),
           decoded_on_cpu=int(sum(on_cpu)))
    # train.py's rank 0 checks the list before it touches the work dir: from the current index (index.check_list),
    # against parsing the list (what that check did before, and still does for a list changed since its index).
    start = time.perf_counter()
    check_list(list_file, root, NUM_CLASSES, index.path)
    from_index = time.perf_counter() - start
    start = time.perf_counter()
    read_video_list(list_file, root, NUM_CLASSES)
    record("start_checks", videos=videos, index_s=round(from_index, 4),
           parse_s=round(time.perf_counter() - start, 3))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.measure:
        measure(*args.measure)
        return
    work = Path(args.data_dir)
    work.mkdir(parents=True, exist_ok=True)
    clips = make_clips(work / "clips", args.clips)
    cold_probe(clips, work)
    cut_cost(clips)
    for count in args.sizes:
        list_file, root = build(work, clips, count)
        with open(index_file(list_file), "rb") as f:  # read once: in the page cache, as for all ranks but the first
            while f.read(1 << 24):
                pass
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        subprocess.run([sys.executable, __file__, "--measure", str(list_file), str(root)], check=True, env=env)
        if not args.keep:
            shutil.rmtree(root)
            list_file.unlink()
            index_file(list_file).unlink()


if __name__ == "__main__":
    main()
