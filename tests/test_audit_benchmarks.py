"""benchmarks/loader.py's peer plumbing (audit round 2, issue 23 item 8): a --peer that is not an executable python
stops at argument parsing with the `make peer-venv` hint. Only a slow subprocess run guarded it."""

import pytest

from benchmarks.loader import parse_args


def test_a_peer_python_that_is_not_there_stops_with_the_make_peer_venv_hint(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_args(["--smoke", "--peer", str(tmp_path / "python")])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"--peer {tmp_path / 'python'}: not an executable python" in err and "make peer-venv" in err
    not_executable = tmp_path / "python3"
    not_executable.write_text("#!/bin/sh\n")
    with pytest.raises(SystemExit):
        parse_args(["--smoke", "--peer", str(not_executable)])
