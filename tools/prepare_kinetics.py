"""Kinetics-400 list files from a download: class folders or the official CSVs; optional re-encode with short GOPs.

    # class-folder trees: videos_train/<class name>/<clip>.mp4 and videos_val/<class name>/<clip>.mp4
    python tools/prepare_kinetics.py --train-dir data/kinetics400/videos_train \\
        --val-dir data/kinetics400/videos_val --out data/kinetics400

    # the official annotation CSVs (label,youtube_id,time_start,time_end,split,...); clips named
    # <youtube_id>_<start:06d>_<end:06d>.<ext>, found in <dir>/<label>/ or directly in <dir>/
    python tools/prepare_kinetics.py --train-csv kinetics400/train.csv --train-dir videos_train \\
        --val-csv kinetics400/validate.csv --val-dir videos_val --out data/kinetics400

    # also rewrite every clip: short side 256, a keyframe every 16 frames (cheap seeking); --codec auto (the
    # default) writes H.264 where a CUDA device is visible and VP9 otherwise (DALI's CPU decoder has no H.264)
    python tools/prepare_kinetics.py ... --reencode --short-side 256 --gop 16

Writes to --out: kinetics400_train_list_videos.txt and kinetics400_val_list_videos.txt (`<path> <label>` with
paths relative to the split's folder, MMAction2's format), class_names.txt (index order: sorted class names, the
order of MMAction2's Kinetics-400 label map, or the order of --class-names), prepare_summary.txt (every file left
out and why: missing, unreadable, empty, audio only), and the lists' video indexes the loader reuses
(dali_pipes/index.py; beside the lists). Every video is
probed (frame counts, keyframes) in parallel. Re-encoding runs in parallel processes and is resumable: finished
files are skipped on a rerun, and an interrupted file never leaves a partial output under its final name. A file
that could not be re-encoded is recorded (reencode_failures.json in the split's re-encode folder, keyed by path,
size and modification time) and not tried again until it changes. The last line printed is the `--set` overrides
that train and test on the lists (the val split doubles as the test split, as in MMAction2's K400 configs); before
it, how many usable videos DALI's CPU decoder cannot read (H.264, HEVC, AV1: a GPU's NVDEC only).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import av
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dali_pipes.lists import VIDEO_EXTENSIONS, ListError, read_class_names  # noqa: E402
from dali_pipes.index import index_file, prepare_index, unchanged_entries  # noqa: E402
from dali_pipes.probe import CPU_CODECS, file_stat, probe_videos  # noqa: E402
from tools.make_synthetic import CODECS, VideoWriter  # noqa: E402

LIST_NAMES = {"train": "kinetics400_train_list_videos.txt", "val": "kinetics400_val_list_videos.txt"}
PARTIAL_TAG = ".partial"
FAILURES_NAME = "reencode_failures.json"  # in each split's re-encode folder: {source: {size, mtime_ns, error}}


@dataclass
class Clip:
    relative: str  # path under the split folder
    class_name: str


def find_class_folder_clips(split_dir: Path) -> list[Clip]:
    """Clips of a `<split_dir>/<class name>/<clip>` tree; underscores in folder names stand for spaces."""
    clips = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        for video in sorted(class_dir.rglob("*")):
            if video.is_file() and video.suffix.lower() in VIDEO_EXTENSIONS and PARTIAL_TAG not in video.name:
                clips.append(Clip(str(video.relative_to(split_dir)), class_dir.name.replace("_", " ")))
    return clips


def find_csv_clips(csv_file: Path, split_dir: Path) -> tuple[list[Clip], list[tuple[str, str]]]:
    """Clips named by an annotation CSV, and (expected name, 'missing') for those not found on disk."""
    clips, missing = [], []
    with open(csv_file, newline="") as f:
        reader = csv.DictReader(f)
        needed = {"label", "youtube_id", "time_start", "time_end"}
        if not reader.fieldnames or not needed <= set(reader.fieldnames):
            raise SystemExit(f"error: {csv_file}: expected the columns {', '.join(sorted(needed))}, "
                             f"got {', '.join(reader.fieldnames or [])}")
        for lineno, row in enumerate(reader, start=2):
            try:
                stem = f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}"
            except ValueError:
                raise SystemExit(f"error: {csv_file}:{lineno}: time_start/time_end must be integers") from None
            label = row["label"].strip()
            found = _find_clip(split_dir, label, stem)
            if found is None:
                missing.append((f"{label}/{stem}", "missing: no file with this name in the folder"))
            else:
                clips.append(Clip(str(found.relative_to(split_dir)), label))
    return clips, missing


def _find_clip(split_dir: Path, label: str, stem: str) -> Path | None:
    for folder in (split_dir / label, split_dir / label.replace(" ", "_"), split_dir):
        for extension in VIDEO_EXTENSIONS:
            candidate = folder / f"{stem}{extension}"
            if candidate.is_file():
                return candidate
    return None


def reencode_video(job: tuple[str, str, int, int, str]) -> tuple[str, str | None]:
    """Rewrites one clip (short side, GOP, codec) into a hidden partial file, then renames it into place."""
    source, target, short_side, gop, codec = job
    target_path = Path(target)
    partial = target_path.with_name(f".{target_path.stem}{PARTIAL_TAG}{target_path.suffix}")
    target_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if os.path.getsize(source) == 0:
            return source, "empty file (0 bytes)"
        with av.open(source) as container:
            if not container.streams.video:
                return source, "no video stream (audio only?)"
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width <= 0 or height <= 0:
                return source, f"invalid frame size {width}x{height}"
            factor = short_side / min(width, height)
            new_w, new_h = (2 * round(width * factor / 2), 2 * round(height * factor / 2))
            fps = float(stream.average_rate or 30)
            muxer = {".webm": "webm", ".mp4": "mp4", ".avi": "avi", ".mkv": "matroska"}[target_path.suffix]
            with VideoWriter(partial, new_w, new_h, fps, codec, gop, quality=23 if codec == "h264" else 32,
                             container=muxer) as writer:
                for frame in container.decode(stream):
                    writer.write(frame.reformat(width=new_w, height=new_h, format="yuv420p"))
            if writer.frames == 0:
                partial.unlink(missing_ok=True)
                return source, "no video frames"
        os.replace(partial, target_path)
    except (av.FFmpegError, OSError) as e:
        partial.unlink(missing_ok=True)
        return source, f"cannot be re-encoded ({' '.join(str(e).split())})"
    return source, None


def reencode_split(split_dir: Path, clips: list[Clip], out_dir: Path, args) -> tuple[list[Clip], list]:
    """Re-encodes the clips of one split into out_dir (same tree), skipping finished ones and the recorded failures
    of unchanged files; returns the new clips and (relative source, reason) for each clip left out."""
    extension = CODECS[args.codec][1]
    for stale in out_dir.rglob(f"*{PARTIAL_TAG}*"):
        stale.unlink()  # left by an interrupted run
    known = read_failure_record(out_dir / FAILURES_NAME)
    jobs, done, new_clips, failures, record = [], 0, [], {}, {}
    for clip in clips:
        source = str(split_dir / clip.relative)
        target = out_dir / Path(clip.relative).with_suffix(extension)
        new_clips.append(Clip(str(target.relative_to(out_dir)), clip.class_name))
        entry = known.get(source)
        if target.is_file():
            done += 1
        elif entry is not None and (entry.get("size"), entry.get("mtime_ns")) == file_stat(source):
            failures[source], record[source] = f"{entry['error']} (recorded in {out_dir / FAILURES_NAME}; tried " \
                                               "again once the file changes)", entry
        else:
            jobs.append((source, str(target), args.short_side, args.gop, args.codec))
    print(f"re-encoding {len(jobs)} clips into {out_dir} ({done} already done, {len(record)} failed before and "
          "unchanged since: not tried again)", file=sys.stderr)
    with ProcessPoolExecutor(args.workers) as pool, progress_bar(f"re-encode {out_dir.name}", len(jobs), "clip") as bar:
        for future in as_completed([pool.submit(reencode_video, job) for job in jobs]):
            source, error = future.result()
            if error is not None:
                failures[source] = error
                size, mtime_ns = file_stat(source)
                record[source] = {"size": size, "mtime_ns": mtime_ns, "error": error}
            bar.update()
    if record or known:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / FAILURES_NAME).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    kept = [c for c, orig in zip(new_clips, clips) if str(split_dir / orig.relative) not in failures]
    return kept, sorted((Path(source).relative_to(split_dir).as_posix(), error) for source, error in failures.items())


def read_failure_record(path: Path) -> dict[str, dict]:
    """{source path: {size, mtime_ns, error}} of the re-encodes that failed before; {} when there is no record."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: not a re-encode failure record ({e}); delete it to try every file again")
    if not isinstance(record, dict) or not all(isinstance(v, dict) and "error" in v for v in record.values()):
        sys.exit(f"error: {path}: not a re-encode failure record (expected {{path: {{size, mtime_ns, error}}}}); "
                 "delete it to try every file again")
    return record


def resolve_codec(codec: str) -> str:
    """--codec auto -> h264 where a CUDA device is visible (NVDEC decodes it on every GPU), else vp9 (DALI's CPU
    decoder reads VP8/VP9/MJPEG, not H.264); an explicit codec as it is. Says which on stderr."""
    if codec != "auto":
        return codec
    import torch  # only here: the tool needs torch for nothing else

    if torch.cuda.is_available():
        print("--codec auto: h264 (a CUDA device is visible; NVDEC decodes H.264 on every GPU; "
              "--codec vp9 for lists a CPU-only machine can train on too)", file=sys.stderr)
        return "h264"
    print("--codec auto: vp9 (no CUDA device visible, and DALI's CPU decoder reads VP8/VP9/MJPEG, not H.264)",
          file=sys.stderr)
    return "vp9"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each option's default, except where there is none (None, or False for a flag), and the
    docstring as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        no_default = action.default is None or action.default is False
        return action.help if no_default else super()._get_help_string(action)


def progress_bar(label: str, total: int, unit: str) -> tqdm:
    """A tqdm bar on stderr (a single-process tool may show one). Redrawn 10 times a second on a terminal; in a log
    file (stderr not a terminal) a line a minute and the final one, so a long run's log stays short."""
    return tqdm(total=total, desc=label, unit=unit, file=sys.stderr, dynamic_ncols=True, disable=total == 0,
                mininterval=0.1 if sys.stderr.isatty() else 60.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=_HelpFormatter,
                                     epilog=__doc__)
    parser.add_argument("--train-dir", help="training videos: a class-folder tree, or the folder the CSV names")
    parser.add_argument("--val-dir", help="validation videos, likewise")
    parser.add_argument("--train-csv", help="official annotation CSV of the training split")
    parser.add_argument("--val-csv", help="official annotation CSV of the validation split")
    parser.add_argument("--out", required=True, help="folder for the list files, class names and summary")
    parser.add_argument("--class-names", help="existing class-name file to take the label order from "
                                              "(e.g. MMAction2's label_map_k400.txt); default: sorted names")
    parser.add_argument("--reencode", action="store_true", help="rewrite every clip (see --short-side, --gop)")
    parser.add_argument("--short-side", type=int, default=256, help="re-encoded short side in pixels")
    parser.add_argument("--gop", type=int, default=16, help="re-encoded frames between keyframes")
    parser.add_argument("--codec", choices=("auto", "h264", "vp9"), default="auto",
                        help="re-encoded codec: h264 decodes on GPUs only; vp9 on CPUs too; auto: h264 where a CUDA "
                             "device is visible, else vp9")
    parser.add_argument("--reencode-dir", help="where re-encoded splits go (default: OUT/reencoded)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="parallel probes / encodes")
    args = parser.parse_args(argv)

    splits = {name: Path(d) for name, d in (("train", args.train_dir), ("val", args.val_dir)) if d}
    if not splits:
        parser.error("give --train-dir and/or --val-dir")
    for name, csv_file in (("train", args.train_csv), ("val", args.val_csv)):
        if csv_file and name not in splits:
            parser.error(f"--{name}-csv needs --{name}-dir (the folder its clips are in)")
    for name, folder in splits.items():
        if not folder.is_dir():
            sys.exit(f"error: --{name}-dir {folder}: no such folder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    found, problems = {}, {}
    for name, folder in splits.items():
        csv_file = {"train": args.train_csv, "val": args.val_csv}[name]
        if csv_file:
            found[name], problems[name] = find_csv_clips(Path(csv_file), folder)
        else:
            found[name], problems[name] = find_class_folder_clips(folder), []
        print(f"{name}: {len(found[name])} clips in {folder}", file=sys.stderr)

    class_names = _class_names(args.class_names, found)
    if args.reencode:
        args.codec = resolve_codec(args.codec)
        reencode_root = Path(args.reencode_dir or out / "reencoded")
        for name in list(splits):
            found[name], failures = reencode_split(splits[name], found[name], reencode_root / name, args)
            problems[name] += failures
            splits[name] = reencode_root / name

    index = {name: i for i, name in enumerate(class_names)}
    usable, gpu_only = {}, {}
    for name, folder in splits.items():
        list_file = out / LIST_NAMES[name]
        paths = [str(folder / clip.relative) for clip in found[name]]
        bars = []  # made on the first call: only the videos the index does not hold are probed

        def show(done: int, total: int) -> None:
            if not bars:
                bars.append(progress_bar(f"probe {name}", total, "video"))
            bars[0].update(done - bars[0].n)

        # Probed before the list exists (it lists the usable clips only); a rerun reuses the index's entries.
        results = unchanged_entries(index_file(list_file), paths)
        infos, failures = probe_videos([p for p in paths if p not in results], args.workers, progress=show)
        results.update(infos)
        results.update(failures)
        failures = {p: r for p, r in results.items() if isinstance(r, str)}
        infos = {p: r for p, r in results.items() if not isinstance(r, str)}
        for bar in bars:
            bar.close()
        problems[name] += [(Path(p).relative_to(folder).as_posix(), reason) for p, reason in failures.items()]
        kept = [clip for clip, path in zip(found[name], paths) if path not in failures]
        list_file.write_text("".join(f"{clip.relative} {index[clip.class_name]}\n" for clip in kept))
        prepare_index(str(list_file), str(folder), len(class_names), index_file(list_file), args.workers,
                      known=results)
        usable[name] = len(kept)
        gpu_only[name] = sum(info.codec not in CPU_CODECS for info in infos.values())
        print(f"{name}: {len(kept)} usable clips -> {list_file} ({len(problems[name])} left out)", file=sys.stderr)
    (out / "class_names.txt").write_text("".join(f"{name}\n" for name in class_names))
    _write_summary(out / "prepare_summary.txt", splits, usable, problems)
    print(f"summary: {out / 'prepare_summary.txt'}", file=sys.stderr)
    if sum(gpu_only.values()):
        print(cpu_decoding_note(gpu_only, usable), file=sys.stderr)
    print("use with: " + " ".join(config_overrides(splits, out)), file=sys.stderr)


def config_overrides(splits: dict[str, Path], out: Path) -> list[str]:
    """The `--set` flags that point train.py and evaluate.py at the lists: train, val, and the val split as the
    test split (MMAction2's K400 configs test on the validation videos)."""
    flags = []
    if "train" in splits:
        flags += [f"--set data.root={splits['train']}", f"--set data.train_list={out / LIST_NAMES['train']}"]
    if "val" in splits:
        for key in ("val", "test"):
            flags += [f"--set data.{key}_root={splits['val']}", f"--set data.{key}_list={out / LIST_NAMES['val']}"]
    return flags + [f"--set data.class_names={out / 'class_names.txt'}"]


def cpu_decoding_note(gpu_only: dict[str, int], usable: dict[str, int]) -> str:
    """One line: how many usable videos only a GPU can decode, and what to do to train on a CPU."""
    counts = ", ".join(f"{name} {gpu_only[name]} of {usable[name]}" for name in gpu_only)
    return (f"{sum(gpu_only.values())} usable videos ({counts}) are in codecs DALI decodes only on a GPU (NVDEC; "
            f"its CPU decoder reads {'/'.join(CPU_CODECS)}): training on a machine without a GPU needs them "
            "rewritten: rerun with --reencode --codec vp9")


def _class_names(class_names_file: str | None, found: dict[str, list[Clip]]) -> list[str]:
    seen = sorted({clip.class_name for clips in found.values() for clip in clips})
    if not class_names_file:
        return seen
    try:
        names = read_class_names(class_names_file)
    except ListError as e:
        sys.exit(f"error: {e}")
    unknown = [n for n in seen if n not in set(names)]
    if unknown:
        sys.exit(f"error: {class_names_file}: {len(unknown)} classes of the videos are not in it "
                 f"(first: '{unknown[0]}')")
    return names


def _write_summary(path: Path, splits: dict, usable: dict, problems: dict) -> None:
    lines = []
    for name, folder in splits.items():
        lines.append(f"{name}: {usable[name]} usable, {len(problems[name])} left out, videos under {folder}")
        lines += [f"  {relative}: {reason}" for relative, reason in sorted(problems[name])]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
