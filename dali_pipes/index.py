"""The video index of a list file: every video's probe results in one binary file, memory-mapped read-only.

One file per list (`<list>.index` beside the list, or `<data.index_dir>/<list name>.<hash of its path>.index`):

    b"R2P1DIDX", header length (uint64 little-endian), a JSON header, then numpy arrays at 64-byte aligned offsets

The header names each array (dtype, length, offset), the small string tables (codec, profile, pixel format and
container names, which the uint8 id columns point into), the list file it was made from (path, size, mtime, the
root its paths are relative to) and a random `nonce` that changes with every write. Arrays, N videos (the list's
distinct paths, in list order) and L list lines:

    path_offsets (N+1), path_blob uint8              UTF-8 paths, CSR: path i is blob[offsets[i]:offsets[i+1]]
    size, mtime_ns int64 (N)                         the file's stat when probed (-1 when missing)
    reason int32 (N)                                 -1: usable, else a row of reason_offsets/reason_blob
    num_frames, width, height, hidden_frames int32 (N)
    codec, profile, pix_fmt, container uint8 (N)     ids into the header's string tables
    keyframe_offsets (N+1), keyframes int32          clean keyframes, CSR
    block_offsets (N+1), block_positions             WebM/Matroska: each clean keyframe's block offset in the file,
                                                     then the end of the last frame (VideoInfo.blocks), CSR
    track int32 (N)                                  the video's Matroska track number (with block_positions)
    packet_offsets (N+1), packet_blob uint8          probe.pack_packets' table, raw zlib bytes, CSR; kept only for
                                                     videos without block positions (MP4: the cut needs each
                                                     packet's place, and MP4 keeps it in its header, not inline)
    extradata_offsets (N+1), extradata_blob uint8
    (offsets and block positions are uint32 when every value fits, else int64)
    line_row, line_label, line_frames int32 (L)      per list line: its video, its label, its frame count (-1)

`VideoIndex.open` maps the file (mmap, read-only) and wraps each array with np.frombuffer: nothing is parsed but
the header, and every process of a machine shares the pages through the page cache. A `VideoInfo` is built only for
a video a batch reads (`VideoIndex.info`). Writes go to a temporary file created with the umask's permissions and
replace the index atomically (os.replace): a reader sees the old file or the new one, never half of one.

`prepare_index` is the prober: exactly one process per run calls it (runtime.build_video_loader: global rank 0).
While the index matches its list (same size and mtime, same root), it stats only the videos the index holds as
unusable (one may have been fixed) and those a journal names. Otherwise it reads the list, reuses every entry of
the old index (or of a version-3 `<list>.probe.json`) whose file stat is unchanged, probes the rest and writes a
new index. A video that changes while the index stands is caught where it is read (segments.read_segment compares
its stat) and journaled.

Unreadable videos found during training are appended to a journal beside the index, one JSON line per video
written with O_APPEND in one write() shorter than PIPE_BUF, in a file per host (`<index>.marks-<host>.jsonl`):
appends from the processes of one machine never interleave, and NFS, whose O_APPEND is not atomic across clients
(open(2), "O_APPEND"), never sees two machines append to one file. The index itself is not rewritten during
training; the prober merges the journals at the next start-up.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import mmap
import os
import re
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dali_pipes.lists import read_video_list
from dali_pipes.probe import VideoInfo, file_stat, probe_videos

LOG = logging.getLogger(__name__)
MAGIC = b"R2P1DIDX"
INDEX_VERSION = 1
LEGACY_CACHE_VERSION = 3  # the `<list>.probe.json` of older code, converted once (`_legacy_entries`)
_ALIGN = 64
_STRING_COLUMNS = ("codec", "profile", "pix_fmt", "container")
_CSR_COLUMNS = {"keyframes": ("keyframe_offsets", "keyframes", np.int32),
                "blocks": ("block_offsets", "block_positions", np.int64),
                "packets": ("packet_offsets", "packet_blob", np.uint8),
                "extradata": ("extradata_offsets", "extradata_blob", np.uint8)}
_SCALAR_COLUMNS = ("num_frames", "width", "height", "hidden_frames", "track")
_ARRAYS = {"path_offsets", "path_blob", "size", "mtime_ns", "reason", "reason_offsets", "reason_blob",
           *_SCALAR_COLUMNS, *_STRING_COLUMNS, *(name for names in _CSR_COLUMNS.values() for name in names[:2]),
           "line_row", "line_label", "line_frames"}
_GATHER_ROWS = 20_000  # rows copied per step when an index is rewritten (bounds the temporary index arrays)
_JOURNAL_LINE_MAX = 4000  # bytes; below PIPE_BUF (4096), so one write() is one unbroken line
_SHOWN = 3


class VideoIndexError(ValueError):
    """An index that cannot be opened, written or used; the message is one line naming the file."""


@dataclass(frozen=True)
class ListMeta:
    """The list file an index was made from: it is current while these match."""
    list_file: str  # absolute path
    size: int
    mtime_ns: int
    root: str

    @classmethod
    def of(cls, list_file: str | Path, root: str) -> "ListMeta":
        path = Path(list_file).resolve()
        try:
            st = path.stat()
        except OSError as e:
            raise VideoIndexError(f"{list_file}: cannot read the video list ({e.strerror})") from e
        return cls(str(path), st.st_size, st.st_mtime_ns, str(root))


def index_file(list_file: str | Path, index_dir: str = "") -> Path:
    """Where the index of `list_file` lives: beside it, or in `index_dir` (data.index_dir) under a name unique to
    the list's absolute path (two lists called train_list.txt do not share one)."""
    if not index_dir:
        return Path(f"{list_file}.index")
    digest = hashlib.sha1(str(Path(list_file).resolve()).encode()).hexdigest()[:10]
    return Path(index_dir) / f"{Path(list_file).name}.{digest}.index"


class VideoIndex:
    """A read-only, memory-mapped index file; see the module docstring for its arrays."""

    def __init__(self, path: Path, header: dict, arrays: dict[str, np.ndarray], buffer):
        self.path, self.header, self.arrays, self._buffer = path, header, arrays, buffer
        self.nonce: str = header["nonce"]
        self.list_meta = ListMeta(**header["list"])
        self.strings: dict[str, list[str]] = header["strings"]
        for name, array in arrays.items():
            setattr(self, name, array)

    @classmethod
    def open(cls, path: str | Path) -> "VideoIndex":
        """Maps the index at `path`; VideoIndexError (one line) when it is not an index of this version."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 16:
                    raise VideoIndexError(f"{path}: not a video index ({size} bytes)")
                buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise VideoIndexError(f"{path}: cannot open the video index ({e.strerror or e})") from e
        if buffer[:8] != MAGIC:
            raise VideoIndexError(f"{path}: not a video index (no {MAGIC.decode()} mark)")
        header_size = int.from_bytes(buffer[8:16], "little")
        try:
            header = json.loads(bytes(buffer[16:16 + header_size]))
            if header.get("version") != INDEX_VERSION:
                raise VideoIndexError(f"{path}: video index of version {header.get('version')}, this code reads "
                                      f"version {INDEX_VERSION}")
            arrays = {name: np.frombuffer(buffer, np.dtype(dtype), count, offset)
                      for name, (dtype, count, offset) in header["arrays"].items()}
            missing = sorted(_ARRAYS - set(arrays))
            if missing:
                raise VideoIndexError(f"{path}: damaged video index (no {missing[0]} array)")
            return cls(path, header, arrays, buffer)
        except (ValueError, KeyError, TypeError) as e:
            if isinstance(e, VideoIndexError):
                raise
            raise VideoIndexError(f"{path}: damaged video index ({e})") from e

    def __len__(self) -> int:
        return len(self.size)

    def video_path(self, row: int) -> str:
        offsets = self.path_offsets
        return bytes(self.path_blob[offsets[row]:offsets[row + 1]]).decode()

    def paths(self) -> list[str]:
        """Every video's path, row order (decodes all of them: for the prober, not the data loader)."""
        return _strings(self.path_offsets, self.path_blob)

    def stat(self, row: int) -> tuple[int, int]:
        return int(self.size[row]), int(self.mtime_ns[row])

    def reason_of(self, row: int) -> str | None:
        """Why video `row` is unusable, None when it is usable."""
        k = int(self.reason[row])
        if k < 0:
            return None
        return bytes(self.reason_blob[self.reason_offsets[k]:self.reason_offsets[k + 1]]).decode()

    def info(self, row: int) -> VideoInfo:
        """The VideoInfo of a usable video, built from its rows of the arrays (a few microseconds)."""
        if self.reason[row] >= 0:
            raise VideoIndexError(f"{self.path}: {self.video_path(row)} is marked unusable ({self.reason_of(row)})")
        csr = {key: self._slice(key, row) for key in _CSR_COLUMNS}
        return VideoInfo(
            num_frames=int(self.num_frames[row]), keyframes=tuple(csr["keyframes"].tolist()),
            codec=self.strings["codec"][self.codec[row]], width=int(self.width[row]), height=int(self.height[row]),
            container=self.strings["container"][self.container[row]],
            profile=self.strings["profile"][self.profile[row]], pix_fmt=self.strings["pix_fmt"][self.pix_fmt[row]],
            packets=_b64(csr["packets"]), extradata=_b64(csr["extradata"]),
            hidden_frames=int(self.hidden_frames[row]), blocks=tuple(csr["blocks"].tolist()),
            track=int(self.track[row]))

    def _slice(self, key: str, row: int) -> np.ndarray:
        offsets_name, flat_name, _ = _CSR_COLUMNS[key]
        offsets = self.arrays[offsets_name]
        return self.arrays[flat_name][offsets[row]:offsets[row + 1]]

    def matches(self, meta: ListMeta) -> bool:
        return self.list_meta == meta


def _b64(data: np.ndarray) -> str:
    """VideoInfo keeps packet tables and extradata as base64 text (the form segments.py reads); the index, raw."""
    return base64.b64encode(data.tobytes()).decode() if len(data) else ""


# --- writing -----------------------------------------------------------------------------------------------------

@dataclass
class Lines:
    """The list's lines: each one's video row, label and frame count from the list (-1 when not given)."""
    row: np.ndarray  # int32 (L,)
    label: np.ndarray  # int32 (L,)
    frames: np.ndarray  # int32 (L,)


def write_index(path: str | Path, meta: ListMeta, paths: list[str], stats: np.ndarray, lines: Lines,
                new: dict[int, VideoInfo | str], old: VideoIndex | None = None,
                source: np.ndarray | None = None) -> None:
    """Writes an index of `paths` (N videos): row i is `new[i]` (a VideoInfo, or the reason it is unusable) when
    given, else row source[i] of `old`, copied array by array (no VideoInfo built). stats: int64 (N, 2)."""
    n = len(paths)
    source = np.full(n, -1, np.int64) if source is None else np.asarray(source, np.int64)
    if old is None and (source >= 0).any():
        raise ValueError("rows copied from an old index need the old index")
    new_rows = np.fromiter(new.keys(), np.int64, len(new))
    copied = source >= 0
    copied[new_rows] = False
    if ((source < 0) & ~np.isin(np.arange(n), new_rows)).any():
        raise ValueError("every row needs a new entry or a source row")
    arrays: dict[str, np.ndarray] = {}
    arrays["path_offsets"], arrays["path_blob"] = _blob([p.encode() for p in paths])
    stats = np.asarray(stats, np.int64).reshape(n, 2)
    arrays["size"], arrays["mtime_ns"] = stats[:, 0].copy(), stats[:, 1].copy()

    # Reasons and string tables: the old tables first, so copied ids stay valid; new strings appended.
    reasons = _StringTable(_strings(old.reason_offsets, old.reason_blob) if old is not None else [])
    strings = {column: _StringTable(old.strings[column] if old is not None else []) for column in _STRING_COLUMNS}
    reason = np.full(n, -1, np.int32)
    scalars = {column: np.zeros(n, np.int32) for column in _SCALAR_COLUMNS}
    ids = {column: np.zeros(n, np.uint8) for column in _STRING_COLUMNS}
    rows_from = source[copied]
    if old is not None and copied.any():
        reason[copied] = old.reason[rows_from]
        for column in _SCALAR_COLUMNS:
            scalars[column][copied] = old.arrays[column][rows_from]
        for column in _STRING_COLUMNS:
            ids[column][copied] = old.arrays[column][rows_from]
    new_flat: dict[str, dict[int, bytes | np.ndarray]] = {key: {} for key in _CSR_COLUMNS}
    for row, entry in new.items():
        if isinstance(entry, str):
            reason[row] = reasons.id(entry)
            continue
        for column in _SCALAR_COLUMNS:
            scalars[column][row] = getattr(entry, column)
        for column in _STRING_COLUMNS:
            ids[column][row] = strings[column].id(getattr(entry, column))
        new_flat["keyframes"][row] = np.asarray(entry.keyframes, np.int32)
        new_flat["blocks"][row] = np.asarray(entry.blocks, np.int64)
        # With block offsets the cut parses the packets' places: no per-packet table (most of the file otherwise)
        new_flat["packets"][row] = np.frombuffer(b"" if entry.blocks else _unb64(entry.packets), np.uint8)
        new_flat["extradata"][row] = np.frombuffer(_unb64(entry.extradata), np.uint8)
    arrays["reason"] = reason
    arrays["reason_offsets"], arrays["reason_blob"] = _blob([r.encode() for r in reasons.values])
    arrays.update(scalars)
    for column in _STRING_COLUMNS:
        if len(strings[column].values) > 256:
            raise VideoIndexError(f"{path}: more than 256 distinct {column} names; the index keeps uint8 ids")
        arrays[column] = ids[column]
    for key, (offsets_name, flat_name, dtype) in _CSR_COLUMNS.items():
        old_offsets = old.arrays[offsets_name] if old is not None else None
        old_flat = old.arrays[flat_name] if old is not None else None
        arrays[offsets_name], arrays[flat_name] = _gather_csr(n, copied, rows_from, old_offsets, old_flat,
                                                             new_flat[key], dtype)
    for name in ("path_offsets", "reason_offsets", "block_positions",
                 *(names[0] for names in _CSR_COLUMNS.values())):
        arrays[name] = _narrow(arrays[name])
    arrays["line_row"], arrays["line_label"] = lines.row.astype(np.int32), lines.label.astype(np.int32)
    arrays["line_frames"] = lines.frames.astype(np.int32)
    header = {"version": INDEX_VERSION, "nonce": uuid.uuid4().hex, "list": meta.__dict__,
              "strings": {column: strings[column].values for column in _STRING_COLUMNS}}
    write_arrays(path, header, arrays)


class _StringTable:
    def __init__(self, values: list[str]):
        self.values = list(values)
        self._ids = {v: i for i, v in enumerate(self.values)}

    def id(self, value: str) -> int:
        if value not in self._ids:
            self._ids[value] = len(self.values)
            self.values.append(value)
        return self._ids[value]


def _strings(offsets: np.ndarray, blob: np.ndarray) -> list[str]:
    """Every string of a CSR pair (offsets, UTF-8 blob), in order: the inverse of _blob."""
    data, bounds = bytes(blob), offsets.tolist()
    return [data[a:b].decode() for a, b in zip(bounds[:-1], bounds[1:])]


def _narrow(values: np.ndarray) -> np.ndarray:
    """uint32 when every value fits (offsets into blobs under 4 GiB, byte positions in files under 4 GiB): a fifth
    of a Kinetics-size index."""
    if not len(values) or (values.min() >= 0 and values.max() < 2**32):
        return values.astype(np.uint32)
    return values.astype(np.int64)


def _blob(parts: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int64, blob uint8): the CSR pair of `parts`."""
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts], dtype=np.int64)]).astype(np.int64)
    return offsets, np.frombuffer(b"".join(parts), np.uint8)


def _unb64(text: str) -> bytes:
    return base64.b64decode(text) if text else b""


def _gather_csr(n: int, copied: np.ndarray, rows_from: np.ndarray, old_offsets, old_flat,
                new_parts: dict[int, np.ndarray], dtype) -> tuple[np.ndarray, np.ndarray]:
    """CSR (offsets, flat) of n rows: copied rows take old rows `rows_from` (vectorised), the others new_parts."""
    lengths = np.zeros(n, np.int64)
    if copied.any():
        lengths[copied] = old_offsets[rows_from + 1] - old_offsets[rows_from]
    for row, part in new_parts.items():
        lengths[row] = len(part)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.empty(int(offsets[-1]), dtype)
    copied_rows = np.nonzero(copied)[0]
    for first in range(0, len(copied_rows), _GATHER_ROWS):  # in chunks: the index arrays are 8x the data copied
        rows = copied_rows[first:first + _GATHER_ROWS]
        chunk_lengths = lengths[rows]
        # flat positions of these rows' elements, and where each comes from in the old flat array
        starts_new, starts_old = offsets[rows], old_offsets[rows_from[first:first + _GATHER_ROWS]]
        within = np.arange(int(chunk_lengths.sum())) - np.repeat(np.cumsum(chunk_lengths) - chunk_lengths,
                                                                  chunk_lengths)
        flat[np.repeat(starts_new, chunk_lengths) + within] = old_flat[np.repeat(starts_old, chunk_lengths) + within]
    for row, part in new_parts.items():
        flat[offsets[row]:offsets[row + 1]] = part
    return offsets, flat


def write_arrays(path: str | Path, header: dict, arrays: dict[str, np.ndarray]) -> None:
    """The file layout (module docstring), written atomically: a temporary file with the umask's permissions
    (os.open mode 0o666, so a colleague can read what this user wrote when the umask allows), then os.replace."""
    path = Path(path)
    layout, offset = {}, 0
    for name, array in arrays.items():
        layout[name] = (array.dtype.str, int(array.size), 0)
    header = {**header, "arrays": layout}
    # Offsets depend on the header's length, which depends on the offsets' digits: fix the header length first.
    text = json.dumps(header).encode()
    header_size = len(text) + 20 * len(arrays) + 64
    offset = _aligned(16 + header_size)
    for name, array in arrays.items():
        layout[name] = (array.dtype.str, int(array.size), offset)
        offset = _aligned(offset + array.nbytes)
    text = json.dumps({**header, "arrays": layout}).encode()
    assert len(text) <= header_size, "header grew past its reserved size"
    text = text.ljust(header_size)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise VideoIndexError(f"{path}: cannot write the video index here ({e.strerror}); set data.index_dir to "
                              f"a writable folder") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + header_size.to_bytes(8, "little") + text)
            for name, array in arrays.items():
                f.seek(layout[name][2])
                f.write(np.ascontiguousarray(array).tobytes())
            f.truncate(offset)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise VideoIndexError(f"{path}: cannot write the video index ({e.strerror}); set data.index_dir to a "
                              f"writable folder") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


# --- the unreadable-video journal -----------------------------------------------------------------------------

def journal_file(index_path: str | Path) -> Path:
    """This machine's journal of the index at `index_path`."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname()) or "host"
    index_path = Path(index_path)
    return index_path.with_name(f"{index_path.name}.marks-{host}.jsonl")


def append_mark(index_path: str | Path, video: str, stat: tuple[int, int], reason: str) -> Path:
    """Appends one line `{"path", "size", "mtime_ns", "reason"}` to this machine's journal in one write(); `stat`
    is the video's stat as the index holds it. Returns the journal's path; OSError when it cannot be written."""
    record = {"path": video, "size": stat[0], "mtime_ns": stat[1], "reason": reason}
    line = (json.dumps(record) + "\n").encode()
    if len(line) > _JOURNAL_LINE_MAX:  # keep it one atomic write: shorten the reason, never the path
        excess = len(line) - _JOURNAL_LINE_MAX + 3
        record["reason"] = reason[:max(0, len(reason) - excess)] + "..."
        line = (json.dumps(record) + "\n").encode()
    journal = journal_file(index_path)
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        if os.write(fd, line) != len(line):
            raise OSError(f"short write to {journal}")
    finally:
        os.close(fd)
    return journal


def _journals(index_path: Path) -> list[Path]:
    """Every machine's journal of this index, and those a prober that died while merging left renamed."""
    folder = index_path.parent
    if not folder.is_dir():
        return []
    prefix = index_path.name + "."
    return sorted(p for p in folder.iterdir()
                  if p.name.startswith(prefix) and re.fullmatch(r"(marks|merging)-.+\.jsonl", p.name[len(prefix):]))


def _take_journals(index_path: Path) -> tuple[dict[str, tuple[tuple[int, int], str]], list[Path]]:
    """The marks of every journal ({path: (stat, reason)}, the last one of a path winning) and the files they came
    from, renamed first so that marks appended from now on go to a new journal (kept for the next merge)."""
    marks, taken = {}, []
    for journal in _journals(index_path):
        if ".marks-" in journal.name:
            merging = journal.with_name(journal.name.replace(".marks-", ".merging-", 1).replace(
                ".jsonl", f"-{os.getpid()}.jsonl"))
            try:
                os.replace(journal, merging)
            except OSError as e:
                raise VideoIndexError(f"{journal}: cannot take the journal of unreadable videos ({e.strerror}); "
                                      f"set data.index_dir to a writable folder") from e
            journal = merging
        taken.append(journal)
        for lineno, text in enumerate(journal.read_text().splitlines(), start=1):
            try:
                record = json.loads(text)
                marks[record["path"]] = ((int(record["size"]), int(record["mtime_ns"])), str(record["reason"]))
            except (ValueError, KeyError, TypeError):
                LOG.warning("%s:%d: not a journal line; ignored", journal, lineno)
    return marks, taken


# --- the prober ---------------------------------------------------------------------------------------------------

def open_index(index_path: str | Path, list_file: str, root: str, num_classes: int) -> VideoIndex:
    """The index the prober wrote for `list_file`, for the processes that did not probe (after the barrier)."""
    if not Path(index_path).exists():
        raise VideoIndexError(f"{index_path}: no video index of {list_file} here after rank 0 probed it: "
                              f"data.index_dir must be a folder every machine of the job sees")
    index = VideoIndex.open(index_path)
    if not index.matches(ListMeta.of(list_file, root)):
        raise VideoIndexError(
            f"{index_path}: written for {index.list_meta.list_file} (root {index.list_meta.root or '.'}) as it was "
            f"then, not for {list_file} as it is now: the prober (rank 0) updates it; data.index_dir must be a "
            f"folder every machine of the job sees")
    check_labels(index, list_file, root, num_classes)
    return index


def check_labels(index: VideoIndex, list_file: str, root: str, num_classes: int) -> None:
    """Labels in [0, num_classes): checked on the index's arrays; the list is parsed only to name the bad line."""
    labels = index.line_label
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        read_video_list(list_file, root, num_classes)  # raises ListError naming file:line
        raise VideoIndexError(f"{index.path}: labels outside [0, {num_classes}) in its list {list_file}")


def check_list(list_file: str, root: str, num_classes: int, index_path: str | Path) -> None:
    """ListError (one line, naming file:line) unless `list_file` parses and its labels lie in [0, num_classes).

    From the index when it is current for the list (same size, mtime and root: its lines were parsed when it was
    written, and the labels are checked on its arrays), so a start with a current index parses nothing (a parse
    of Kinetics-400's 240k-line list takes seconds); else by parsing the list."""
    try:
        index = VideoIndex.open(index_path)
        current = index.matches(ListMeta.of(list_file, root))
    except VideoIndexError:  # no index, a damaged one, or no list (the parse below names it)
        current = False
    if current:
        check_labels(index, list_file, root, num_classes)
    else:
        read_video_list(list_file, root, num_classes)


def prepare_index(list_file: str, root: str, num_classes: int, index_path: str | Path, num_workers: int = 8,
                  progress: Callable[[int, int], None] | None = None,
                  known: dict[str, VideoInfo | str] | None = None) -> VideoIndex:
    """The prober: brings the index of `list_file` up to date (module docstring) and returns it opened.

    `known`: probe results the caller has just found (tools/prepare_kinetics.py probes before it writes the list),
    used instead of probing those videos again.
    """
    known = known or {}
    index_path = Path(index_path)
    meta = ListMeta.of(list_file, root)
    old = None
    if index_path.exists():
        try:
            old = VideoIndex.open(index_path)
        except VideoIndexError as e:
            LOG.warning("%s; probing the list again", e)
    current = old is not None and old.matches(meta)
    journals = _journals(index_path)
    if current and not journals and not (old.reason >= 0).any():
        check_labels(old, list_file, root, num_classes)
        _warn_if_unwritable(index_path)
        return old
    marks, taken = _take_journals(index_path) if journals else ({}, [])
    if current:
        paths = old.paths()
        lines = Lines(old.line_row.copy(), old.line_label.copy(), old.line_frames.copy())
        previous = {p: i for i, p in enumerate(paths)}
        # Rows to look at again: unusable ones (fixed since?) and journaled ones; the rest stand without a stat.
        check = set(np.nonzero(old.reason >= 0)[0].tolist()) | {previous[p] for p in marks if p in previous}
    else:
        records = read_video_list(list_file, root, num_classes)
        paths = list(dict.fromkeys(r.path for r in records))
        rows = {p: i for i, p in enumerate(paths)}
        lines = Lines(np.array([rows[r.path] for r in records], np.int32),
                      np.array([r.label for r in records], np.int32),
                      np.array([r.num_frames if r.num_frames is not None else -1 for r in records], np.int32))
        previous = {p: i for i, p in enumerate(old.paths())} if old is not None else {}
        check = set(range(len(paths)))
    stats = np.zeros((len(paths), 2), np.int64)
    source = np.full(len(paths), -1, np.int64)
    if current:
        stats[:, 0], stats[:, 1] = old.size, old.mtime_ns
        source[:] = np.arange(len(paths))
    legacy = _legacy_entries(Path(f"{list_file}.probe.json")) if old is None else {}
    new: dict[int, VideoInfo | str] = {}
    todo: list[int] = []
    for row in sorted(check):
        path = paths[row]
        stat = file_stat(path)
        stats[row] = stat
        source[row] = -1
        was = previous.get(path)
        if path in marks and marks[path][0] == stat:
            new[row] = marks[path][1]  # failed while being read, and unchanged since
        elif was is not None and old.stat(was) == stat and (stat[0] >= 0 or old.reason[was] >= 0):
            if stat[0] < 0:  # still missing
                new[row] = old.reason_of(was)
            else:
                source[row] = was
        elif path in legacy and legacy[path][0] == stat:
            new[row] = legacy[path][1]
        elif path in known:
            new[row] = known[path]
        else:
            todo.append(row)
    if legacy:
        LOG.info("%s: converted %d entries of the version-%d probe cache %s.probe.json", index_path,
                 sum(1 for r in new if paths[r] in legacy), LEGACY_CACHE_VERSION, list_file)
    if current and not new and not todo and (source == np.arange(len(paths))).all():
        for journal in taken:  # marks of videos no longer listed
            journal.unlink(missing_ok=True)
        check_labels(old, list_file, root, num_classes)
        _warn_if_unwritable(index_path)
        return old  # nothing changed: no rewrite
    if todo:
        infos, failures = probe_videos([paths[r] for r in todo], num_workers, progress)
        for row in todo:
            new[row] = infos.get(paths[row]) or failures[paths[row]]
    write_index(index_path, meta, paths, stats, lines, new, old, source)
    for journal in taken:
        journal.unlink(missing_ok=True)
    index = VideoIndex.open(index_path)
    check_labels(index, list_file, root, num_classes)
    return index


def unchanged_entries(index_path: str | Path, paths: list[str]) -> dict[str, VideoInfo | str]:
    """{path: VideoInfo or reason} of those `paths` the index at `index_path` holds with the file's current stat
    (for a caller that probes before its list exists); {} without a readable index."""
    try:
        index = VideoIndex.open(index_path)
    except VideoIndexError:
        return {}
    rows = {p: i for i, p in enumerate(index.paths())}
    entries = {}
    for path in paths:
        row = rows.get(path)
        if row is not None and index.stat(row) == file_stat(path) and index.size[row] >= 0:
            entries[path] = index.reason_of(row) or index.info(row)
    return entries


def _warn_if_unwritable(index_path: Path) -> None:
    if not os.access(index_path.parent, os.W_OK):
        LOG.warning("%s: its folder is not writable: a video found unreadable during this run cannot be recorded "
                    "for the next (set data.index_dir to a writable folder)", index_path)


def _legacy_entries(cache_file: Path) -> dict[str, tuple[tuple[int, int], VideoInfo | str]]:
    """{path: (stat, VideoInfo or reason)} of a version-3 probe cache; {} when there is none or it is unusable
    (warned). Its entries predate VideoInfo.hidden_frames: -1 (unknown) unless the entry has it."""
    try:
        data = json.loads(cache_file.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        LOG.warning("%s: unreadable probe cache (%s); probing instead", cache_file, e)
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("videos"), dict):
        LOG.warning("%s: not a probe cache (no 'videos' table); probing instead", cache_file)
        return {}
    if data.get("version") != LEGACY_CACHE_VERSION:
        LOG.warning("%s: probe cache of version %s, only version %d is converted; probing instead", cache_file,
                    data.get("version"), LEGACY_CACHE_VERSION)
        return {}
    entries, malformed = {}, 0
    for path, entry in data["videos"].items():
        try:
            stat = tuple(int(v) for v in entry["stat"])
            if isinstance(entry.get("error"), str):
                entries[path] = (stat, entry["error"])
                continue
            info = entry["info"]
            entries[path] = (stat, VideoInfo(**{"hidden_frames": -1, **info,
                                                "keyframes": tuple(int(k) for k in info["keyframes"])}))
        except (AttributeError, KeyError, TypeError, ValueError):
            malformed += 1
    if malformed:
        LOG.warning("%s: %d malformed probe cache entries; probing them", cache_file, malformed)
    return entries


# --- what a loader reads: the usable lines of one list ------------------------------------------------------

class ListVideos:
    """The usable lines of an index's list, as arrays (video i of the loader is list line lines[i]):
    `rows` (index row), `labels`, `num_frames` (the file's count, or the list's when smaller). Deterministic in the
    index file, so a DALI source worker rebuilds the same from the index path alone."""

    def __init__(self, index: VideoIndex):
        self.index = index
        line_row = index.line_row
        usable = index.reason[line_row] < 0
        self.lines = np.nonzero(usable)[0].astype(np.int32)
        self.rows = line_row[self.lines]
        self.labels = index.line_label[self.lines]
        listed, probed = index.line_frames[self.lines], index.num_frames[self.rows]
        self.num_frames = np.where(listed > 0, np.minimum(listed, probed), probed).astype(np.int32)
        self._mismatched = (listed > 0) & (listed != probed)
        self._unusable_lines = np.nonzero(~usable)[0]

    @classmethod
    def open(cls, index_path: str, nonce: str) -> "ListVideos":
        """For a source worker: the index the loader opened (same nonce), or VideoIndexError if it was replaced."""
        index = VideoIndex.open(index_path)
        if index.nonce != nonce:
            raise VideoIndexError(f"{index_path}: replaced since this run opened it (another job re-indexed the list); "
                                  f"restart the run")
        return cls(index)

    def __len__(self) -> int:
        return len(self.rows)

    def path(self, i: int) -> str:
        return self.index.video_path(int(self.rows[i]))

    def info(self, i: int) -> VideoInfo:
        return self.index.info(int(self.rows[i]))

    def stat(self, i: int) -> tuple[int, int]:
        return self.index.stat(int(self.rows[i]))

    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of each unusable video (once per video, list order)."""
        rows = dict.fromkeys(self.index.line_row[self._unusable_lines].tolist())
        return [(self.index.video_path(r), self.index.reason_of(r)) for r in rows]

    def mismatched(self) -> list[str]:
        """'path (list N, file M)' of the lines whose frame count differs from the file's."""
        out = []
        for i in np.nonzero(self._mismatched)[0][:_SHOWN].tolist():
            row = int(self.rows[i])
            out.append(f"{self.path(i)} (list {self.index.line_frames[self.lines[i]]}, "
                       f"file {self.index.num_frames[row]})")
        return out

    def mismatch_count(self) -> int:
        return int(self._mismatched.sum())

    def decoder_fields(self) -> "DecoderFields":
        """Per usable video, what nvdec.plan_decoding reads (codec, profile, pix_fmt, width, height, hidden_frames):
        one shared record per distinct combination, no VideoInfo built per video."""
        return DecoderFields(self)

    def not_among(self, codecs: tuple[str, ...]) -> np.ndarray:
        """Indices of the usable videos whose codec is not one of `codecs` (on the uint8 ids, no VideoInfo built)."""
        allowed = [k for k, name in enumerate(self.index.strings["codec"]) if name in codecs]
        return np.nonzero(~np.isin(self.index.codec[self.rows], allowed))[0]


@dataclass(frozen=True)
class DecoderSummary:
    """The fields of a VideoInfo that decide where it is decoded (nvdec.py)."""
    codec: str
    profile: str
    pix_fmt: str
    width: int
    height: int
    hidden_frames: int


class DecoderFields:
    """A sequence of DecoderSummary, one per usable video, sharing one object per distinct combination."""

    def __init__(self, videos: ListVideos):
        index, rows = videos.index, videos.rows
        columns = [index.codec[rows], index.profile[rows], index.pix_fmt[rows], index.width[rows],
                   index.height[rows], index.hidden_frames[rows]]
        # One int64 per video, then np.unique of it (np.unique over rows, axis=0, takes seconds at 700k videos):
        # each column's values are replaced by their rank among its distinct values, and the ranks mixed radix.
        key = np.zeros(len(rows), np.int64)
        distinct = []
        for column in columns:
            values, ranks = np.unique(column, return_inverse=True)
            distinct.append(values.tolist())
            key = key * len(values) + ranks.reshape(-1)
        keys, self._which = np.unique(key, return_inverse=True)
        self._which = self._which.reshape(-1)
        strings = index.strings
        self._summaries = []
        for k in keys.tolist():
            digits = []
            for values in reversed(distinct):
                k, digit = divmod(k, len(values))
                digits.append(values[digit])
            c, p, f, w, h, hidden = reversed(digits)
            self._summaries.append(DecoderSummary(strings["codec"][c], strings["profile"][p], strings["pix_fmt"][f],
                                                  w, h, hidden))

    def __len__(self) -> int:
        return len(self._which)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        return self._summaries[self._which[i]]

    def __iter__(self):
        summaries = self._summaries
        return (summaries[k] for k in self._which.tolist())
