"""Video list files and class names, validated line by line.

Two list formats are read, one video per line (blank lines and lines starting with '#' are skipped):
- MMAction2's video list: `relative/path.mp4 <label>`;
- the Kinetics-400 validation list MMAction2's README links: `<video_id> <num_frames> <label_index>`, fields
  separated by commas or spaces; a video id without a file extension is looked up under the root as .mp4, .webm,
  .mkv or .avi (the first that exists), as MMAction2 appends '.mp4'.
Paths are relative to `root` (absolute paths are kept). A malformed line or a label outside [0, num_classes)
stops with `file:line: what is wrong`.

Class-name files (read_class_names): one name per line in label order, `name,index` / `name index` lines, or JSON.
The indexed form is chosen when every line ends in a number, so a plain file of names that all end in digits is
misread; use JSON for those.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi")
_FIELD_SPLIT = re.compile(r"\s*,\s*|\s+")


@dataclass(frozen=True)
class VideoRecord:
    path: str  # file path (root joined)
    label: int  # class index
    num_frames: int | None = None  # frame count when the list carries it


class ListError(ValueError):
    """A list or class-name file that cannot be used; one line naming file:line."""


def read_video_list(list_file: str | Path, root: str | Path, num_classes: int) -> list[VideoRecord]:
    """Parses a video list (either format) into records with full paths, checking every label."""
    list_file = Path(list_file)
    try:
        lines = list_file.read_text().splitlines()
    except OSError as e:
        raise ListError(f"{list_file}: cannot read the video list ({e.strerror})") from e
    records = []
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        records.append(_parse_line(text, list_file, lineno, Path(root), num_classes))
    if not records:
        raise ListError(f"{list_file}: no videos listed")
    return records


def _parse_line(text: str, list_file: Path, lineno: int, root: Path, num_classes: int) -> VideoRecord:
    where = f"{list_file}:{lineno}"
    if "," in text:
        fields = _FIELD_SPLIT.split(text)
    else:
        fields = text.rsplit(None, 2) if _looks_like_three_fields(text) else text.rsplit(None, 1)
    if len(fields) not in (2, 3):
        raise ListError(f"{where}: expected '<video> <label>' or '<video_id> <num_frames> <label>', "
                        f"got {len(fields)} fields")
    label = _parse_int(fields[-1], where, "label")
    if not 0 <= label < num_classes:
        raise ListError(f"{where}: label {label} is outside [0, {num_classes}) (model.num_classes is {num_classes})")
    num_frames = None
    if len(fields) == 3:
        num_frames = _parse_int(fields[1], where, "num_frames")
        if num_frames <= 0:
            raise ListError(f"{where}: num_frames must be positive, got {num_frames}")
    return VideoRecord(str(_resolve(root, fields[0])), label, num_frames)


def _looks_like_three_fields(text: str) -> bool:
    parts = text.split()
    return len(parts) >= 3 and parts[-1].lstrip("-").isdigit() and parts[-2].lstrip("-").isdigit()


def _parse_int(text: str, where: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ListError(f"{where}: {name} must be an integer, got '{text}'") from None


def _resolve(root: Path, name: str) -> Path:
    path = Path(name) if Path(name).is_absolute() else root / name
    if path.suffix.lower() in VIDEO_EXTENSIONS:
        return path
    for extension in VIDEO_EXTENSIONS:
        candidate = path.with_name(path.name + extension)
        if candidate.exists():
            return candidate
    return path.with_name(path.name + ".mp4")


def read_class_names(path: str | Path, num_classes: int | None = None) -> list[str]:
    """Class names in label order, from one name per line, `name,index` / `name index` lines, or a JSON map.

    A text file whose every line ends in a number (after a comma or a space) is read as `name index` lines, so
    names that end in digits (`hidden class 007`) are taken for indices: write such names as JSON (a list in
    label order) or make one of them not end in a number.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ListError(f"{path}: cannot read the class names ({e.strerror})") from e
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as e:
            raise ListError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
        if isinstance(mapping, list):
            names = [str(name) for name in mapping]
        elif isinstance(mapping, dict):
            names = _names_from_indices([(str(k), v, f"{path}: '{k}'") for k, v in mapping.items()], path)
        else:
            raise ListError(f"{path}: expected a JSON list of names or an object name -> index")
    else:
        rows = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        indexed = [re.fullmatch(r"(.+?)\s*[,\s]\s*(\d+)", line) for _, line in rows]
        if rows and all(indexed):
            names = _names_from_indices(
                [(m.group(1).strip().strip('"'), int(m.group(2)), f"{path}:{n}") for m, (n, _) in zip(indexed, rows)],
                path)
        else:
            names = [line for _, line in rows]
    if num_classes is not None and len(names) != num_classes:
        raise ListError(f"{path}: {len(names)} class names, but model.num_classes is {num_classes}")
    return names


def _names_from_indices(rows: list[tuple[str, object, str]], path: Path) -> list[str]:
    names: dict[int, str] = {}
    for name, index, where in rows:
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise ListError(f"{where}: class index must be a non-negative integer, got {index!r}")
        if index in names:
            raise ListError(f"{where}: class index {index} is given twice ('{names[index]}' and '{name}')")
        names[index] = name
    missing = sorted(set(range(len(names))) - set(names))
    if missing:
        raise ListError(f"{path}: class indices are not 0..{len(names) - 1}: {missing[0]} is missing")
    return [names[i] for i in range(len(names))]


def class_names_or_indices(path: str | Path, num_classes: int) -> list[str]:
    """read_class_names of `path`, or `class_<index>` names when no file is given ('' or None)."""
    if path:
        return read_class_names(path, num_classes)
    return [f"class_{i}" for i in range(num_classes)]
