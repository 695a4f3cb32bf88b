"""The first multi-process run: local rank 0 probes the list while the other processes wait, however long it takes.

The wait must not be bounded by the process group's collective timeout (NCCL: 10 minutes; a cold probe of
Kinetics-400 takes longer), and rank 0 shows the probe's progress.
"""

import datetime
import errno
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from config import ConfigError
from runtime import DIST_TIMEOUT_ENV, _dist_timeout, probe_with_progress

REPO = Path(__file__).resolve().parents[1]
GROUP_TIMEOUT_S = 2  # the process group's collective timeout in the two-process run

WORKER = textwrap.dedent("""
    import logging, os, sys, time
    from pathlib import Path
    sys.path.insert(0, {repo!r})
    from config import load_config
    from runtime import build_video_loader, init_distributed, setup_logging, teardown_distributed

    rank = int(os.environ["RANK"])
    # Start the group together: on a busy machine the imports alone can differ by more than its 2-second timeout.
    ready = Path(sys.argv[1])
    (ready / f"ready{{rank}}").touch()
    deadline = time.monotonic() + 120
    while not all((ready / f"ready{{r}}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline, "the other process did not start"
        time.sleep(0.01)
    setup_logging(rank)
    # The probe's own "probing N of M videos" line (INFO, which rank 1 does not log) counted on every rank: only
    # rank 0 may probe, the other reads rank 0's cache after the barrier.
    probes = []
    probe_log = logging.getLogger("dali_pipes.probe")
    probe_log.addFilter(lambda record: probes.append(record.getMessage()) or True)
    probe_log.setLevel(logging.INFO)
    ctx = init_distributed()
    cfg = load_config(None, sys.argv[2:])
    loader = build_video_loader(cfg, "train", ctx, 2)
    print(f"rank {{rank}} loader ready: {{len(loader.records)}} videos", flush=True)
    print(f"rank {{rank}} probed here: {{sum(m.startswith('probing ') for m in probes)}} times", flush=True)
    teardown_distributed()
""")


def copy_list(motion_set: Path, folder: Path) -> Path:
    """The motion set's training list in a folder of its own, so its probe cache is this test's alone."""
    folder.mkdir()
    list_file = folder / "train_list.txt"
    list_file.write_text((motion_set / "train_list.txt").read_text())
    return list_file


def test_probe_progress_lines(motion_set, tmp_path, caplog):
    def probed_lines(list_file, interval_s):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="runtime"):
            probe_with_progress(str(list_file), str(motion_set), 4, num_workers=2, interval_s=interval_s)
        return [r.getMessage() for r in caplog.records if r.name == "runtime" and "probed" in r.getMessage()]

    list_file = copy_list(motion_set, tmp_path / "every")
    count = len(list_file.read_text().splitlines())
    lines = probed_lines(list_file, interval_s=0.0)  # a line after every video
    assert len(lines) == count, lines
    assert all(line.startswith(f"train_list.txt: probed {i}/{count} videos (") for i, line in enumerate(lines, 1))
    assert "/s, eta " in lines[0] and lines[-1].endswith("/s, eta 0:00:00)")
    assert probed_lines(list_file, interval_s=0.0) == []  # cached: nothing to probe, nothing to report
    lines = probed_lines(copy_list(motion_set, tmp_path / "hourly"), interval_s=3600.0)
    assert len(lines) == 1 and lines[0].startswith(f"train_list.txt: probed {count}/{count} videos"), lines


def hold_reader(fifo: Path, hold_s: float, deadline_s: float = 120) -> None:
    """Waits until a process opens `fifo` to read, keeps it waiting `hold_s` seconds, then lets it read '{}'."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as e:  # ENXIO: nobody reads it yet
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    # Rank 0 is inside its probe (reading the probe cache) and rank 1 waits for it. Holding rank 0 there for
    # a multiple of the group's timeout is the scenario itself: a probe that outlasts the collective timeout.
    time.sleep(hold_s)
    try:
        os.write(fd, b"{}")
    except BrokenPipeError:  # rank 0 is gone (torchrun stops the job when rank 1 fails); its output says why
        pass
    finally:
        os.close(fd)


@pytest.mark.slow
def test_a_probe_longer_than_the_group_timeout_does_not_break_the_run(motion_set, tmp_path):
    list_file = copy_list(motion_set, tmp_path / "lists")
    count = len(list_file.read_text().splitlines())
    # The probe cache as a named pipe: rank 0's probe blocks reading it until the test writes, deterministically
    # longer than the group's timeout, whatever the machine's speed.
    os.mkfifo(f"{list_file}.probe.json")
    (tmp_path / "ready").mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER.format(repo=str(REPO)))
    overrides = [f"data.root={motion_set}", f"data.train_list={list_file}", "data.num_threads=1",
                 "model.num_classes=4"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", DIST_TIMEOUT_ENV: str(GROUP_TIMEOUT_S)}
    process = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                str(worker), str(tmp_path / "ready"), *overrides], cwd=tmp_path, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        hold_reader(tmp_path / "lists" / "train_list.txt.probe.json", hold_s=2 * GROUP_TIMEOUT_S)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    assert f"rank 0 loader ready: {count} videos" in output and f"rank 1 loader ready: {count} videos" in output
    assert "rank 0 probed here: 1 times" in output and "rank 1 probed here: 0 times" in output  # the barrier held
    assert f"train_list.txt: probed {count}/{count} videos" in output  # rank 0's progress
    assert (tmp_path / "lists" / "train_list.txt.probe.json").is_file()  # the probe replaced the pipe


def test_group_timeout_setting(monkeypatch):
    monkeypatch.delenv(DIST_TIMEOUT_ENV, raising=False)
    assert _dist_timeout() is None  # torch's default
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "1800")
    assert _dist_timeout() == datetime.timedelta(minutes=30)
    for bad in ("ten", "0", "-5", "inf"):
        monkeypatch.setenv(DIST_TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=f"{DIST_TIMEOUT_ENV}='{bad}': expected a number of seconds > 0"):
            _dist_timeout()
