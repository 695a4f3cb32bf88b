"""lists.class_names_or_indices, shared by predict.py and browse_dataset (audit round 2, issue 23 item 8): only a
slow predict.py run guarded its `class_<index>` names."""

from dali_pipes.lists import class_names_or_indices


def test_without_a_file_the_names_are_class_and_the_label_index(tmp_path):
    assert class_names_or_indices("", 3) == ["class_0", "class_1", "class_2"]
    assert class_names_or_indices(None, 1) == ["class_0"]
    names = tmp_path / "names.txt"
    names.write_text("run\njump\n")
    assert class_names_or_indices(str(names), 2) == ["run", "jump"]
