"""List files and class names: both list formats, and one-line errors that name file:line."""

import json

import pytest

from dali_pipes.lists import ListError, VideoRecord, read_class_names, read_video_list


def test_mmaction2_video_list(tmp_path):
    (tmp_path / "list.txt").write_text("# comment\nabseiling/a.mp4 0\n\n  b c/clip with space.webm 3  \n/abs/x.mkv 2\n")
    records = read_video_list(tmp_path / "list.txt", tmp_path / "videos", num_classes=4)
    assert records == [
        VideoRecord(str(tmp_path / "videos/abseiling/a.mp4"), 0, None),
        VideoRecord(str(tmp_path / "videos/b c/clip with space.webm"), 3, None),
        VideoRecord("/abs/x.mkv", 2, None),
    ]


def test_kinetics_val_list_with_frame_counts(tmp_path):
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "vid_b.webm").write_bytes(b"x")
    (tmp_path / "val.txt").write_text("vid_a, 300, 5\nvid_b 250 7\n")
    records = read_video_list(tmp_path / "val.txt", tmp_path / "videos", num_classes=400)
    assert records == [VideoRecord(str(tmp_path / "videos/vid_a.mp4"), 5, 300),  # MMAction2 appends .mp4
                       VideoRecord(str(tmp_path / "videos/vid_b.webm"), 7, 250)]  # an existing extension wins


@pytest.mark.parametrize("line, message", [
    ("lonely.mp4", "list.txt:2: expected '<video> <label>' or '<video_id> <num_frames> <label>', got 1 fields"),
    ("a.mp4 cat", "list.txt:2: label must be an integer, got 'cat'"),
    ("a.mp4 400", "list.txt:2: label 400 is outside [0, 400) (model.num_classes is 400)"),
    ("a.mp4 -1", "list.txt:2: label -1 is outside [0, 400)"),
    ("vid, 0, 3", "list.txt:2: num_frames must be positive, got 0"),
    ("vid, many, 3", "list.txt:2: num_frames must be an integer, got 'many'"),
    ("a, b, c, d", "list.txt:2: expected '<video> <label>' or '<video_id> <num_frames> <label>', got 4 fields"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, message):
    (tmp_path / "list.txt").write_text(f"ok.mp4 1\n{line}\n")
    with pytest.raises(ListError) as info:
        read_video_list(tmp_path / "list.txt", tmp_path, num_classes=400)
    assert str(info.value).startswith(f"{tmp_path / 'list.txt'}:{message.split('list.txt:', 1)[1]}")


def test_missing_and_empty_lists(tmp_path):
    with pytest.raises(ListError, match=r"nope\.txt: cannot read the video list"):
        read_video_list(tmp_path / "nope.txt", tmp_path, 4)
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(ListError, match=r"empty\.txt: no videos listed"):
        read_video_list(tmp_path / "empty.txt", tmp_path, 4)


def test_class_name_formats(tmp_path):
    (tmp_path / "plain.txt").write_text("abseiling\nair drumming\n")
    assert read_class_names(tmp_path / "plain.txt", 2) == ["abseiling", "air drumming"]
    (tmp_path / "indexed.txt").write_text("air drumming,1\nabseiling,0\n")
    assert read_class_names(tmp_path / "indexed.txt") == ["abseiling", "air drumming"]
    (tmp_path / "map.json").write_text(json.dumps({"b": 1, "a": 0}))
    assert read_class_names(tmp_path / "map.json") == ["a", "b"]
    (tmp_path / "list.json").write_text(json.dumps(["a", "b", "c"]))
    assert read_class_names(tmp_path / "list.json") == ["a", "b", "c"]


def test_class_name_errors(tmp_path):
    (tmp_path / "plain.txt").write_text("a\nb\n")
    with pytest.raises(ListError, match=r"plain\.txt: 2 class names, but model.num_classes is 400"):
        read_class_names(tmp_path / "plain.txt", 400)
    (tmp_path / "dup.txt").write_text("a 0\nb 0\n")
    with pytest.raises(ListError, match=r"dup\.txt:2: class index 0 is given twice \('a' and 'b'\)"):
        read_class_names(tmp_path / "dup.txt")
    (tmp_path / "gap.txt").write_text("a 0\nb 2\n")
    with pytest.raises(ListError, match=r"gap\.txt: class indices are not 0..1: 1 is missing"):
        read_class_names(tmp_path / "gap.txt")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ListError, match=r"bad\.json: not valid JSON"):
        read_class_names(tmp_path / "bad.json")
