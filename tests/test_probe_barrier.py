"""The first multi-process run: rank 0 probes the list while the other processes wait, however long it takes.

The wait must not be bounded by the process group's collective timeout (NCCL: 10 minutes; a cold probe of
Kinetics-400 takes longer), and rank 0 shows the probe's progress. Two torchrun launchers (`--nnodes 2` on one
machine, one file system) probe the list once between them.
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
    """The motion set's training list in a folder of its own, so its index is this test's alone."""
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
    # Rank 0 is inside its probe (reading the old probe cache to convert it) and rank 1 waits for it. Holding it there for
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
    # An old probe cache as a named pipe: rank 0's probe blocks reading it (to convert it) until the test writes,
    # deterministically longer than the group's timeout, whatever the machine's speed.
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
    assert (tmp_path / "lists" / "train_list.txt.index").is_file()


def test_group_timeout_setting(monkeypatch):
    monkeypatch.delenv(DIST_TIMEOUT_ENV, raising=False)
    assert _dist_timeout() is None  # torch's default
    monkeypatch.setenv(DIST_TIMEOUT_ENV, "1800")
    assert _dist_timeout() == datetime.timedelta(minutes=30)
    for bad in ("ten", "0", "-5", "inf"):
        monkeypatch.setenv(DIST_TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match=f"{DIST_TIMEOUT_ENV}='{bad}': expected a number of seconds > 0"):
            _dist_timeout()


LAUNCHED = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {repo!r})
    import dali_pipes.probe as probe
    from config import load_config
    from runtime import build_video_loader, init_distributed, setup_logging, teardown_distributed

    probe_video = probe.probe_video

    def counted(path):  # one line per video probed, naming the process that probed it
        with open(sys.argv[1], "a") as f:
            f.write(f"{{os.environ['RANK']}} {{path}}\\n")
        return probe_video(path)

    probe.probe_video = counted
    setup_logging(int(os.environ["RANK"]))
    ctx = init_distributed()
    cfg = load_config(None, sys.argv[2:])
    loader = build_video_loader(cfg, "train", ctx, 2)
    print(f"rank {{ctx.rank}} of {{ctx.world_size}} loader ready: {{len(loader.records)}} videos, index "
          f"{{loader.index.nonce}}", flush=True)
    teardown_distributed()
""")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_launchers_on_one_file_system_probe_once_with_the_index_outside_a_read_only_data_folder(
        motion_set, tmp_path):
    """`torchrun --nnodes 2` twice on one machine, as two machines sharing a file system: exactly one process
    (global rank 0) probes, and both nodes' ranks open the same index, kept in data.index_dir. The data folder is
    chmod a-w; tests run as root, which could write there anyway, so what is proved is that nothing was: its
    listing is unchanged."""
    data = tmp_path / "data"
    list_file = copy_list(motion_set, data)
    count = len(list_file.read_text().splitlines())
    index_dir = tmp_path / "indexes"
    index_dir.mkdir()
    worker = tmp_path / "worker.py"
    worker.write_text(LAUNCHED.format(repo=str(REPO)))
    probes = tmp_path / "probes.txt"
    overrides = [f"data.root={motion_set}", f"data.train_list={list_file}", f"data.index_dir={index_dir}",
                 "data.num_threads=1", "model.num_classes=4"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    port = free_port()
    before = sorted(os.listdir(data))
    data.chmod(0o555)
    launchers = []
    try:
        for node in (0, 1):
            launchers.append(subprocess.Popen(
                [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node-rank={node}",
                 "--nproc-per-node=1", "--master-addr=127.0.0.1", f"--master-port={port}", str(worker), str(probes),
                 *overrides], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [launcher.communicate(timeout=240)[0] for launcher in launchers]
    finally:
        for launcher in launchers:
            launcher.kill()
        data.chmod(0o755)
    assert [launcher.returncode for launcher in launchers] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    ready = [line for output in outputs for line in output.splitlines() if "loader ready" in line]
    assert sorted(line.split(" loader")[0] for line in ready) == ["rank 0 of 2", "rank 1 of 2"], outputs
    assert len({line.split("index ")[1] for line in ready}) == 1  # both opened the one file rank 0 wrote
    assert all(f"{count} videos" in line for line in ready)
    probed = probes.read_text().splitlines()
    assert len(probed) == count and {line.split()[0] for line in probed} == {"0"}, probed
    assert sorted(os.listdir(data)) == before and len(list(index_dir.iterdir())) == 1
