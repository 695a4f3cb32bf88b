"""What train.py and evaluate.py share at run time: processes, logging, metric reduction, seeds, loaders.

Both scripts run as one plain process (`python train.py ...`) or under torchrun, which sets RANK, WORLD_SIZE and
LOCAL_RANK; `init_distributed` reads those and joins the process group (NCCL on GPUs, gloo on CPUs), with the
collective timeout R2P1D_DIST_TIMEOUT_S (seconds) when that is set, under a store prefix of its own for each start
of the job, so workers that torchrun --max-restarts started again rendezvous cleanly. StopRequests turns SIGTERM,
SIGINT and SIGUSR1 into a stop after the same training step on every process. Every helper here also works
without a process group, as the single-process case of the same code.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import json
import logging
import math
import os
import platform
import random
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from config import Config, ConfigError
from dali_pipes.index import VideoIndex
from dali_pipes.lists import ListError
from dali_pipes.loader import LoaderError, VideoLoader, mode_list, open_list_index
from model import CheckpointError
from threads_env import core_share, cores_and_processes, user_omp_num_threads

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
WORK_DIRS = Path("work_dirs")
SAVED_CONFIG_NAME = "config.yaml"  # the resolved config train.py writes into its work dir
DIST_TIMEOUT_ENV = "R2P1D_DIST_TIMEOUT_S"  # collective timeout of the process group, s (unset: torch's default)
# How long the other processes wait for rank 0 to probe a list. A cold probe of
# Kinetics-400's ~240k training videos demuxes every packet of every file and can outlast NCCL's 10-minute
# collective timeout; a dead prober ends the wait at once (torchrun stops the job, gloo sees the
# closed connection), so this bound only matters for a prober stuck on a hung file system.
PROBE_WAIT_TIMEOUT = datetime.timedelta(hours=24)
PROBE_LOG_INTERVAL_S = 30.0  # rank 0 logs the probe's progress this often
LOCK_NAME = ".lock"  # train.py's work-dir lock file (fcntl.flock; the holder's pid, host and start time inside)
GPU_AUTO_DALI_THREADS = 4  # data.num_threads=0 on a GPU machine: DALI's CPU threads, at most the process's share
GENERATION_PREFIX = "r2p1d_generation"  # store keys of init_distributed's per-start handshake
GENERATION_POLL_S = 1.0  # how long a rank waits for rank 0's acknowledgement before it reads the generation again
DEFAULT_PG_TIMEOUT = datetime.timedelta(minutes=30)  # torch's default for gloo; bounds the start-up handshake


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among world_size processes and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    generation: int = 0  # starts of the job's process group so far, this one included (0: no process group)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def cuda_index(self) -> int | None:
        return self.device.index if self.device.type == "cuda" else None


def init_distributed() -> DistContext:
    """Joins torchrun's process group when WORLD_SIZE > 1 and binds this process to GPU LOCAL_RANK (if any)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                               f"start at most that many processes per node (torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    generation = 0
    if world_size > 1 and not dist.is_initialized():
        timeout = _dist_timeout()
        store, generation = _generation_store(rank, world_size, timeout or DEFAULT_PG_TIMEOUT)
        backend = dict(device_id=device, backend="nccl") if device.type == "cuda" else dict(backend="gloo")
        dist.init_process_group(store=store, rank=rank, world_size=world_size, timeout=timeout, **backend)
    return DistContext(rank, world_size, local_rank, device, generation)


def _generation_store(rank: int, world_size: int, timeout: datetime.timedelta) -> tuple[dist.Store, int]:
    """The rendezvous store (MASTER_ADDR:MASTER_PORT) under a prefix no earlier start of this job wrote to.

    torchrun (torch >= 2.4) keeps one store for all restarts of a job (`--max-restarts`): the process group of a
    restarted worker would read the addresses its dead predecessors left there and wait on them (the gloo
    connection fails or hangs). TORCHELASTIC_RESTART_COUNT cannot name a fresh prefix: each node's agent counts its
    own restarts (a node whose workers did not fail restarts them without counting), so the nodes disagree.
    Instead rank 0 takes the next generation number from a counter in the store, and every other rank learns it
    through a handshake only the live rank 0 answers: it posts a random token under the generation it reads and
    waits for rank 0 to acknowledge that token; a number left by an earlier start is never acknowledged (its rank
    0 is gone), so the rank reads again. Returns the store prefixed by the generation, and the generation (1 for
    a job's first start).
    """
    store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
    current = f"{GENERATION_PREFIX}/current"
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        generation = store.add(f"{GENERATION_PREFIX}/counter", 1)
        store.set(current, str(generation))
        for other in range(1, world_size):
            hello = f"{GENERATION_PREFIX}/{generation}/hello/{other}"
            store.wait([hello], timeout)
            store.set(f"{GENERATION_PREFIX}/{generation}/welcome/{store.get(hello).decode()}", "1")
    else:
        token = uuid.uuid4().hex
        while True:
            generation = int(store.get(current))  # blocks until rank 0 of the first start has set it
            store.set(f"{GENERATION_PREFIX}/{generation}/hello/{rank}", token)
            if _wait_for_key(store, f"{GENERATION_PREFIX}/{generation}/welcome/{token}", GENERATION_POLL_S):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"rank {rank}: rank 0 did not join the process group at MASTER_ADDR "
                                   f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within "
                                   f"{timeout.total_seconds():.0f} s; check that rank 0's process started "
                                   f"(its log), or raise {DIST_TIMEOUT_ENV}")
    return dist.PrefixStore(f"{GENERATION_PREFIX}/{generation}/pg", store), generation


def _wait_for_key(store: dist.Store, key: str, timeout_s: float) -> bool:
    """Whether `key` appears in `store` within timeout_s (polled: a timed-out store.wait logs a C++ warning)."""
    deadline = time.monotonic() + timeout_s
    while not store.check([key]):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _dist_timeout() -> datetime.timedelta | None:
    """R2P1D_DIST_TIMEOUT_S as a timedelta; None (torch's default: 10 min NCCL, 30 min gloo) when unset."""
    value = os.environ.get(DIST_TIMEOUT_ENV, "")
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < 1e9:  # also refuses nan and inf
        raise ConfigError(f"{DIST_TIMEOUT_ENV}={value!r}: expected a number of seconds > 0, or unset it for "
                          f"torch's default")
    return datetime.timedelta(seconds=seconds)


def teardown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class WorkDirBusy(RuntimeError):
    """Another train.py holds the work dir's lock; the message is one line naming it."""


# Bad user input: each ends a command with one `error: ...` line (run_command), never a traceback.
USER_ERRORS = (ConfigError, CheckpointError, ListError, LoaderError, WorkDirBusy)


def run_command(run: Callable[[Any, DistContext], Any], args: Any) -> None:
    """`run(args, ctx)` inside the process group; bad user input ends the process with one `error: ...` line,
    which also goes into the run's log file when one is open.

    Ctrl-C outside train.py's training loop (where StopRequests handles it) ends the process with one line too,
    from rank 0 only, and the exit code 130 (stop_exit_code).
    """
    try:
        ctx = init_distributed()
        try:
            run(args, ctx)
        finally:
            teardown_distributed()
    except USER_ERRORS as e:
        _write_to_log_files(f"error: {e}")
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":
            print("stopped by SIGINT (Ctrl-C); nothing saved", file=sys.stderr)
        sys.exit(stop_exit_code(signal.SIGINT))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)  # schedulers' preemption, Ctrl-C, SLURM --signal


def stop_exit_code(signum: int) -> int:
    """The exit code of a process that a stop signal ended: 128 + its number (SIGTERM 143, SIGINT 130, SIGUSR1
    138), the shell's convention for a process a signal ended, so schedulers and scripts read it as such."""
    return 128 + int(signum)


class StopRequests:
    """SIGTERM, SIGINT and SIGUSR1 turned into a stop that every process makes after the same training step.

    Schedulers preempt with SIGTERM (Kubernetes, SLURM at the end) or a chosen signal ahead of time (SLURM
    `--signal=USR1@120`); torchrun forwards SIGTERM and SIGINT (and SIGUSR1 with `--signals-to-handle`) to its
    workers; Ctrl-C sends SIGINT to every process of the terminal. The handler only notes the signal (no logging:
    it may run while the logging lock is held); the training loop calls requested() after each step, which
    all-reduces the noted signal over the processes, because they receive it at different steps and must all stop
    after the same one. On GPUs the reduction runs in a gloo group of its own, so it does not wait for the GPU.
    Construct it on every rank (on GPUs it makes a group, a collective); close() gives the signals back.
    """

    def __init__(self, ctx: DistContext):
        self.noted = 0  # the first signal this process received, 0: none
        self.signum = 0  # the signal all processes agreed to stop for, 0: none yet
        self.group = None
        if ctx.distributed and ctx.device.type == "cuda":
            self.group = dist.new_group(backend="gloo")
        self.previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        self.noted = self.noted or signum

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        """Whether any process received a stop signal; the same answer on every process (a collective)."""
        flag = torch.tensor([self.noted], dtype=torch.int64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        self.signum = int(flag.item())
        return self.signum != 0


def is_main_process() -> bool:
    """Rank 0, or the only process; for messages every rank could print but one should."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class _StartupRecords(logging.Handler):
    """Keeps the records logged before the log file exists, so attach_log_file can write them into it."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


FILE_ONLY = {"file_only": True}  # `log.info(..., extra=FILE_ONLY)`: into the log file, not onto the console


def setup_logging(rank: int, log_file: Path | None = None, keep_records: bool = False) -> None:
    """The one logging setup: rank 0 logs INFO to stdout (and log_file); other ranks WARNING+ with their rank.
    Records logged with `extra=FILE_ONLY` (long text such as the resolved config) go to log_file only.

    keep_records: hold what is logged until attach_log_file names the log file (train.py opens it only once the
    start-up checks passed and the work dir is locked, so a failed start leaves no log behind).
    """
    if rank == 0:
        formatter = logging.Formatter("%(asctime)s %(message)s", datefmt="%m/%d %H:%M:%S")
        level = logging.INFO
    else:
        formatter = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", datefmt="%m/%d %H:%M:%S")
        level = logging.WARNING
    console = logging.StreamHandler(sys.stdout)
    console.addFilter(lambda record: not getattr(record, "file_only", False))
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file))
    elif keep_records:
        handlers.append(_StartupRecords())
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=handlers, force=True)


def attach_log_file(log_file: Path) -> None:
    """Starts writing the log to log_file, beginning with the records setup_logging(keep_records=True) kept."""
    root = logging.getLogger()
    handler = logging.FileHandler(log_file)
    for kept in [h for h in root.handlers if isinstance(h, _StartupRecords)]:
        handler.setFormatter(kept.formatter)
        for record in kept.records:
            handler.handle(record)
        root.removeHandler(kept)
    root.addHandler(handler)


def _write_to_log_files(message: str) -> None:
    """`message` into the log files only (the console gets it from sys.exit), as an ERROR record."""
    record = logging.LogRecord("runtime", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def environment_info(ctx: DistContext) -> str:
    """One line with the versions and the hardware a result depends on, logged at startup."""
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}", f"DALI {_dali_version()}"]
    if ctx.device.type == "cuda":
        parts += [f"CUDA {torch.version.cuda}", f"cuDNN {torch.backends.cudnn.version()}",
                  f"GPU {torch.cuda.get_device_name(ctx.device)}"]
    else:
        parts.append("device cpu (fp32)")
    parts.append(f"{ctx.world_size} process{'es' if ctx.world_size != 1 else ''}")
    if ctx.generation > 1:
        parts.append(f"start {ctx.generation} of this job's process group (workers restarted)")
    return ", ".join(parts)


def _dali_version() -> str:
    try:
        import nvidia.dali
    except ImportError:
        return "not installed"
    return nvidia.dali.__version__


@dataclass(frozen=True)
class ThreadBudget:
    """How this process splits its share of the machine's cores between DALI, its source workers and torch."""

    cores: int  # CPUs this process may run on (os.sched_getaffinity)
    processes: int  # processes of this job on this machine sharing them (torchrun's LOCAL_WORLD_SIZE)
    dali_threads: int  # data.num_threads as used
    source_workers: int  # data.source_workers (processes cutting segments; one core each while they work)
    torch_threads: int | None  # torch intra-op threads; None: left as torch set them (a GPU machine)
    dali_from: str  # 'config' (data.num_threads > 0) or 'auto'
    torch_from: str  # 'OMP_NUM_THREADS', 'auto' or 'torch default'

    @property
    def share(self) -> int:
        """The cores one process may count on (at least one)."""
        return core_share(self.cores, self.processes)

    def describe(self) -> str:
        used = self.dali_threads + self.source_workers + (self.torch_threads or 0)
        torch_part = (f"torch {self.torch_threads} ({self.torch_from})" if self.torch_threads is not None
                      else f"torch threads left as they are ({torch.get_num_threads()}, GPU machine)")
        if (self.dali_from, self.torch_from) == ("auto", "auto"):
            over = "; DALI's threads overlap torch's (they decode while torch computes)"
        else:
            over = f"; over the share by {used - self.share}" if used > self.share else ""
        return (f"threads: {self.cores} cores for {self.processes} process{'es' if self.processes != 1 else ''} "
                f"here, {self.share} for this one: DALI {self.dali_threads} ({self.dali_from}) + source workers "
                f"{self.source_workers} + {torch_part}{over}")


def decide_thread_budget(num_threads: int, source_workers: int, on_gpu: bool, cores: int, processes: int,
                         omp_num_threads: str | None) -> ThreadBudget:
    """The thread split of one process within its share of the cores (cores // processes).

    num_threads is data.num_threads (0: auto) and omp_num_threads the OMP_NUM_THREADS environment value (None or
    '': unset); an explicit value of either is kept, and the automatic one gets what is left of the share (at
    least 1). Automatic on a CPU: the share less the source workers is the room; torch gets all of it and DALI
    half of it (rounded down, at least 1). DALI's threads overlap torch's on purpose: they decode the next batches
    while torch computes and sleep while it waits, and torch's OpenMP threads wait passively (threads_env.py sets
    OMP_WAIT_POLICY and OMP_NUM_THREADS before the scripts load torch), so the overlap costs little. Measured on
    the 2-core dev machine (benchmarks/cpu_threads.py, docs/PERFORMANCE.md "CPU threads"): torch 2 + DALI 1 was
    the fastest split idle and beside a 2-process load; torch 1 + DALI 1 ran at 0.73x of it idle; the old
    setting (torch a thread per core, DALI 4, spinning waits) at 0.67x under load. On a GPU torch does little CPU work:
    its threads are left alone and DALI gets min(GPU_AUTO_DALI_THREADS, what the share leaves).
    """
    room = max(1, core_share(cores, processes) - source_workers)  # for DALI and torch together
    torch_threads: int | None = None
    torch_from = "torch default"
    if omp_num_threads:
        try:
            torch_threads = int(omp_num_threads)
        except ValueError:
            torch_threads = 0
        if torch_threads <= 0:
            raise ConfigError(f"OMP_NUM_THREADS={omp_num_threads!r}: expected a whole number >= 1, or unset it "
                              f"for the automatic thread budget")
        torch_from = "OMP_NUM_THREADS"
    if num_threads > 0:
        dali_threads, dali_from = num_threads, "config"
    elif on_gpu:
        dali_threads, dali_from = min(GPU_AUTO_DALI_THREADS, room), "auto"
    elif torch_threads is not None:
        dali_threads, dali_from = max(1, room - torch_threads), "auto"
    else:
        dali_threads, dali_from = max(1, room // 2), "auto"
    if torch_threads is None and not on_gpu:
        torch_threads, torch_from = (room if dali_from == "auto" else max(1, room - dali_threads)), "auto"
    return ThreadBudget(cores, processes, dali_threads, source_workers, torch_threads, dali_from, torch_from)


def apply_thread_budget(cfg: Config, ctx: DistContext) -> Config:
    """Decides this process's thread budget once (decide_thread_budget), sets torch's intra-op threads, logs it in
    one line and returns cfg with data.num_threads resolved (cfg itself keeps 0 = auto, as the user wrote it)."""
    cores, processes = cores_and_processes()
    budget = decide_thread_budget(cfg.data.num_threads, cfg.data.source_workers, ctx.device.type == "cuda",
                                  cores=cores, processes=processes, omp_num_threads=user_omp_num_threads())
    if budget.torch_threads is not None and budget.torch_threads != torch.get_num_threads():
        torch.set_num_threads(budget.torch_threads)
    if ctx.is_main:
        log.info("%s", budget.describe())
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, num_threads=budget.dali_threads))


@dataclass
class WorkDirLock:
    """train.py's hold on a work dir: an flock on WORK_DIR/.lock, released by the OS when the process ends in any
    way (kill -9 included), so a lock is never stale. Keep the object for the whole run; close() releases it."""

    path: Path
    fd: int

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def lock_work_dir(work_dir: Path) -> WorkDirLock:
    """Creates work_dir if needed and takes its lock; WorkDirBusy naming the holder when another process has it.

    The holder's pid, host and start time are written into the lock file only after the lock is taken (a
    process that fails to take it never truncates the holder's text).
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process (it is starting)"
        os.close(fd)
        raise WorkDirBusy(f"{work_dir} is in use by {holder}; wait for it or use another --work-dir") from None
    except BaseException:
        os.close(fd)
        raise
    since = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    text = f"train.py pid {os.getpid()} on host {socket.gethostname()} since {since}\n".encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, text, 0)
    return WorkDirLock(path, fd)


def on_main_then_all(step: Callable[[], Any], ctx: DistContext) -> Any:
    """step() on rank 0 only; a user error it raises (USER_ERRORS) is raised on every rank, so all of them stop
    with the same one line instead of the others waiting in a collective for a rank that has gone. Returns
    step()'s result on rank 0 and None on the others. Any other exception is raised on rank 0 as it is and ends
    the others with a RuntimeError saying so."""
    result, error, crash = None, None, None
    if ctx.is_main:
        try:
            result = step()
        except USER_ERRORS as e:
            error = e
        except Exception as e:
            crash, error = e, RuntimeError(f"rank 0 failed at start-up ({type(e).__name__}: {e}); see its output")
    if ctx.distributed:
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        error = outcome[0]
    if crash is not None:
        raise crash
    if error is not None:
        raise error
    return result


def configure_determinism(deterministic: bool) -> None:
    """`--deterministic` as MMAction2 has it; otherwise cuDNN autotunes its kernels (no effect on a CPU)."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS reads it at its first call
        # The backward passes of 3-D max/average pooling have no deterministic CUDA kernel: warn, do not stop.
        torch.use_deterministic_algorithms(True, warn_only=True)


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an amp mode (bf16/fp16/none) on `device`; None (fp32) on a CPU."""
    return AMP_DTYPES[mode] if device.type == "cuda" else None


def default_work_dir(config_path: str | Path) -> Path:
    """work_dirs/<config file stem>, as MMAction2 names it; for a run's saved config.yaml, that run's folder."""
    config_path = Path(config_path)
    if config_path.name == SAVED_CONFIG_NAME and config_path.is_file():
        return config_path.parent
    return WORK_DIRS / config_path.stem


class ProbeProgress:
    """probe_videos' progress callback: '<list>: probed N/M videos (r/s, eta h:mm:ss)' every interval_s and at
    the end (plain lines, no bar: several processes share the terminal under torchrun)."""

    def __init__(self, name: str, interval_s: float = PROBE_LOG_INTERVAL_S):
        self.name, self.interval_s = name, interval_s
        self.start = self.last_log = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - self.last_log < self.interval_s:
            return
        self.last_log = now
        per_s = done / max(now - self.start, 1e-9)
        log.info("%s: probed %d/%d videos (%.0f/s, eta %s)", self.name, done, total, per_s,
                 format_duration((total - done) / per_s))


def probe_with_progress(list_file: str, root: str, num_classes: int, num_workers: int,
                        interval_s: float = PROBE_LOG_INTERVAL_S, index_dir: str = "") -> VideoIndex:
    """Brings the list's video index up to date (probing what changed; dali_pipes/index.py) and returns it opened,
    logging the progress of a long probe."""
    return open_list_index(list_file, root, num_classes, index_dir, num_workers, probe=True,
                           progress=ProbeProgress(Path(list_file).name, interval_s))


def build_video_loader(cfg: Config, mode: str, ctx: DistContext, batch_size: int,
                       views: tuple[int, int] = (1, 1), dtype: torch.dtype | None = None,
                       channels_last: bool = False) -> VideoLoader:
    """The DALI VideoLoader of this process's shard for mode train, val or test.

    Global rank 0 is the one prober of the run: it brings the list's index up to date (logging its progress) while
    the others wait, then every process opens that index once and hands it to its loader. One prober for the whole
    job, not one per machine: the index lives on a file system every machine sees (data.index_dir, or beside the
    list), and a single writer needs no file lock (locks are unreliable on some network file systems).
    """
    list_file, root = mode_list(cfg.data, mode)
    if not list_file:
        raise LoaderError(f"data.{mode}_list: no list file given for {mode}")
    probe_group = None
    if ctx.distributed:
        # The others wait for the probe in a gloo group of their own whose timeout covers it (PROBE_WAIT_TIMEOUT)
        # rather than in the default group, whose timeout (NCCL: 10 min) should stay short to catch a hung step.
        probe_group = dist.new_group(backend="gloo", timeout=PROBE_WAIT_TIMEOUT)
    index = None
    try:
        if ctx.rank == 0:
            index = probe_with_progress(list_file, root, cfg.model.num_classes, max(cfg.data.num_threads, 4),
                                        index_dir=cfg.data.index_dir)
        if probe_group is not None:
            dist.barrier(group=probe_group)
    finally:
        if probe_group is not None:
            dist.destroy_process_group(probe_group)
    if index is None:
        index = open_list_index(list_file, root, cfg.model.num_classes, cfg.data.index_dir, probe=False)
    return VideoLoader(cfg.data, mode, batch_size, cfg.model.num_classes, shard_id=ctx.rank,
                       num_shards=ctx.world_size, device_id=ctx.cuda_index, seed=cfg.train.seed, views=views,
                       dtype=dtype or torch.float32, channels_last=channels_last, index=index)


def log_skipped_videos(skipped: list[tuple[str, str]], list_name: str, shown: int = 10) -> None:
    """A warning per left-out video (the first `shown`) from rank 0, so none is skipped without a trace."""
    if not is_main_process():
        return
    for path, reason in skipped[:shown]:
        log.warning("%s: skipped %s (%s)", list_name, path, reason)
    if len(skipped) > shown:
        log.warning("%s: … %d more videos skipped", list_name, len(skipped) - shown)


def reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over all processes (a copy; `values` itself is unchanged)."""
    total = values.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def reduce_max(values: torch.Tensor) -> torch.Tensor:
    """The element-wise maximum of `values` over all processes."""
    top = values.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    return top


def gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order, on every process ([obj] without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def sync_buffers(model: nn.Module) -> None:
    """Averages the floating-point buffers (BN running mean/var) over all processes, as mmengine's SyncBuffersHook.

    DDP runs with broadcast_buffers=False, so each rank's BNs collect statistics of its own batches until here.
    Integer counters (num_batches_tracked) are equal on every rank already: all run the same number of steps.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).float() for b in buffers])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def seed_everything(seed: int) -> None:
    """Seeds Python's random, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """This process's random generator states, as types torch.load(weights_only=True) accepts."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what rng_state() returned (the CUDA part only where there is a GPU)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def format_duration(seconds: float) -> str:
    """0:41:10 style (hours may exceed 24)."""
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated since the last call, in GiB (0 on a CPU); resets the peak."""
    if device.type != "cuda":
        return 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


class MetricLog:
    """Rank 0's scalar outputs in the work dir: TensorBoard event files and scalars.jsonl, one JSON object a line.

    `tensorboard --logdir WORK_DIR` shows the scalars. A run that starts at iteration `start_step` (a resume, or 0)
    first drops what an earlier run logged after that step, which the new run logs again: scalars.jsonl loses
    its lines with a larger step (rewritten atomically), and the event files are read with those steps purged
    (SummaryWriter's purge_step, which drops the events with step >= purge_step: start_step + 1, so the points at
    start_step itself, such as the last epoch's validation, are kept).
    """

    def __init__(self, work_dir: Path, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(work_dir), purge_step=start_step + 1)
        path = Path(work_dir) / "scalars.jsonl"
        _drop_lines_after(path, start_step)
        self.jsonl = open(path, "a")

    def add_scalars(self, scalars: dict[str, float], step: int, **fields: Any) -> None:
        """Writes each scalar under its tag (e.g. train/loss) and one JSON line with `fields`, step and scalars."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({**fields, "step": step, **scalars}) + "\n")
        self.jsonl.flush()

    def add_text(self, tag: str, text: str) -> None:
        self.writer.add_text(tag, text)

    def close(self) -> None:
        self.writer.close()
        self.jsonl.close()


def _drop_lines_after(path: Path, step: int) -> None:
    """Rewrites scalars.jsonl without its lines whose step exceeds `step` (temporary file, then a rename)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if _jsonl_step(line) <= step]
    if len(kept) == len(lines):
        return
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    log.info("%s: dropped %d lines after step %d, which this run logs again", path.name, len(lines) - len(kept),
             step)


def _jsonl_step(line: str) -> float:
    """The step of a scalars.jsonl line; infinite (dropped) for a line a kill cut short."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
