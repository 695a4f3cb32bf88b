"""What train.py and evaluate.py share at run time: processes, logging, metric reduction, seeds, loaders.

Both scripts run as one plain process (`python train.py ...`) or under torchrun, which sets RANK, WORLD_SIZE and
LOCAL_RANK; `init_distributed` reads those and joins the process group (NCCL on GPUs, gloo on CPUs), with the
collective timeout R2P1D_DIST_TIMEOUT_S (seconds) when that is set. Every helper here also works without a
process group, as the single-process case of the same code.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from config import Config, ConfigError
from dali_pipes.lists import ListError, read_video_list
from dali_pipes.loader import LoaderError, VideoLoader, mode_list, probe_cache_file
from dali_pipes.probe import probe_videos
from model import CheckpointError

log = logging.getLogger(__name__)

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
WORK_DIRS = Path("work_dirs")
SAVED_CONFIG_NAME = "config.yaml"  # the resolved config train.py writes into its work dir
DIST_TIMEOUT_ENV = "R2P1D_DIST_TIMEOUT_S"  # collective timeout of the process group, s (unset: torch's default)
# How long the other processes wait for the first process of each machine to probe a list. A cold probe of
# Kinetics-400's ~240k training videos demuxes every packet of every file and can outlast NCCL's 10-minute
# collective timeout; a dead prober ends the wait at once (torchrun stops the job, gloo sees the
# closed connection), so this bound only matters for a prober stuck on a hung file system.
PROBE_WAIT_TIMEOUT = datetime.timedelta(hours=24)
PROBE_LOG_INTERVAL_S = 30.0  # rank 0 logs the probe's progress this often


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: its rank among world_size processes and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

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
    if world_size > 1 and not dist.is_initialized():
        timeout = _dist_timeout()
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return DistContext(rank, world_size, local_rank, device)


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


def run_command(run: Callable[[Any, DistContext], Any], args: Any) -> None:
    """`run(args, ctx)` inside the process group; bad user input ends the process with one `error: ...` line."""
    try:
        ctx = init_distributed()
        try:
            run(args, ctx)
        finally:
            teardown_distributed()
    except (ConfigError, CheckpointError, ListError, LoaderError) as e:
        sys.exit(f"error: {e}")


def is_main_process() -> bool:
    """Rank 0, or the only process; for messages every rank could print but one should."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


FILE_ONLY = {"file_only": True}  # `log.info(..., extra=FILE_ONLY)`: into the log file, not onto the console


def setup_logging(rank: int, log_file: Path | None = None) -> None:
    """The one logging setup: rank 0 logs INFO to stdout (and log_file); other ranks WARNING+ with their rank.
    Records logged with `extra=FILE_ONLY` (long text such as the resolved config) go to log_file only."""
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
    for handler in handlers:
        handler.setFormatter(formatter)
    logging.basicConfig(level=level, handlers=handlers, force=True)


def environment_info(ctx: DistContext) -> str:
    """One line with the versions and the hardware a result depends on, logged at startup."""
    parts = [f"Python {platform.python_version()}", f"torch {torch.__version__}", f"DALI {_dali_version()}"]
    if ctx.device.type == "cuda":
        parts += [f"CUDA {torch.version.cuda}", f"cuDNN {torch.backends.cudnn.version()}",
                  f"GPU {torch.cuda.get_device_name(ctx.device)}"]
    else:
        parts.append("device cpu (fp32)")
    parts.append(f"{ctx.world_size} process{'es' if ctx.world_size != 1 else ''}")
    return ", ".join(parts)


def _dali_version() -> str:
    try:
        import nvidia.dali
    except ImportError:
        return "not installed"
    return nvidia.dali.__version__


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
                        interval_s: float = PROBE_LOG_INTERVAL_S) -> None:
    """Probes the videos of a list into its cache (`<list>.probe.json`), logging the progress of a long probe."""
    records = read_video_list(list_file, root, num_classes)
    probe_videos([r.path for r in records], cache_file=probe_cache_file(list_file), num_workers=num_workers,
                 progress=ProbeProgress(Path(list_file).name, interval_s))


def build_video_loader(cfg: Config, mode: str, ctx: DistContext, batch_size: int,
                       views: tuple[int, int] = (1, 1), dtype: torch.dtype | None = None,
                       channels_last: bool = False) -> VideoLoader:
    """The DALI VideoLoader of this process's shard for mode train, val or test.

    The first process of each machine probes the list's videos first (rank 0 logging its progress), so the
    others read its cache instead of probing every video once per process.
    """
    probe_group = None
    if ctx.distributed:
        # The others wait for the probe in a gloo group of their own whose timeout covers it (PROBE_WAIT_TIMEOUT)
        # rather than in the default group, whose timeout (NCCL: 10 min) should stay short to catch a hung step.
        # A barrier in a group, unlike a wait on a file, also holds the other machines until every first
        # process of a machine is done.
        probe_group = dist.new_group(backend="gloo", timeout=PROBE_WAIT_TIMEOUT)
    try:
        if ctx.local_rank == 0:
            list_file, root = mode_list(cfg.data, mode)
            if list_file:  # VideoLoader reports a missing list
                probe_with_progress(list_file, root, cfg.model.num_classes, max(cfg.data.num_threads, 4))
        if probe_group is not None:
            dist.barrier(group=probe_group)
    finally:
        if probe_group is not None:
            dist.destroy_process_group(probe_group)
    return VideoLoader(cfg.data, mode, batch_size, cfg.model.num_classes, shard_id=ctx.rank,
                       num_shards=ctx.world_size, device_id=ctx.cuda_index, seed=cfg.train.seed, views=views,
                       dtype=dtype or torch.float32, channels_last=channels_last)


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

    `tensorboard --logdir WORK_DIR` shows the scalars; a resumed run purges the events after its start step, so
    the curves of the interrupted run and the resumed one do not overlap.
    """

    def __init__(self, work_dir: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(work_dir), purge_step=purge_step)
        self.jsonl = open(Path(work_dir) / "scalars.jsonl", "a")

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
