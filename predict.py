"""Classify videos with a trained R(2+1)D: the top-5 classes and their probabilities per video.

    python predict.py clip.mp4                                    # newest run in work_dirs/: config + best checkpoint
    python predict.py a.mp4 b.webm --work-dir work_dirs/k400_8x8x1 --json
    python predict.py clip.mp4 --config k400_8x8x1.yaml \\
        --checkpoint r2plus1d_r34_8xb8-8x8x1-180e_kinetics400-rgb_20220812-47cfe041.pth --class-names label_map_k400.txt

Each video is tested as evaluate.py tests (test.views clips x crops, softmax per view, mean over views), with the
same frame sampling, resizing and crops. DALI decodes where it can on the device data.decode_device chooses (the
GPU's NVDEC for what it takes on this GPU (dali_pipes/nvdec.py), plus, with data.decode_device=auto, the
VP8/VP9/MJPEG videos it refuses on DALI's CPU decoder; the CPU for VP8/VP9/MJPEG only, also on a GPU machine with
data.decode_device=cpu); the other videos are decoded with PyAV (`--decoder auto`). The DALI videos share one
loader and each is decoded once. Class names come from --class-names, else data.class_names of the config, else
`class_<index>`. With more than a handful of videos a progress bar runs on stderr; results go to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from threads_env import set_openmp_defaults  # nothing in it imports torch

set_openmp_defaults()  # before torch loads its OpenMP runtime, which reads them once

import torch
from tqdm import tqdm

from config import ConfigError, DataConfig, add_config_arguments, parse_views, views_argument
from dali_pipes.lists import VIDEO_EXTENSIONS, ListError, class_names_or_indices
from dali_pipes.loader import LoaderError, UnreadableVideo, VideoLoader
from dali_pipes.nvdec import nvdec_refusal
from dali_pipes.probe import CPU_CODECS, ProbeError, VideoInfo, probe_video
from dali_pipes.pyav_clips import eval_views
from evaluate import average_views, inference_setup, resolve_run
from model import CheckpointError, build_model, load_checkpoint
from runtime import DistContext, apply_thread_budget

log = logging.getLogger("predict")
TOP_K = 5
PROGRESS_MIN_VIDEOS = 5  # more videos than this: a progress bar on stderr


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Top-5 classes of each video with a trained R(2+1)D.")
    parser.add_argument("videos", nargs="+", metavar="VIDEO",
                        help="video files (any container and codec PyAV or DALI reads), or folders: the files "
                             f"ending in {', '.join(VIDEO_EXTENSIONS)} directly inside, in name order")
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--checkpoint", help="checkpoint file, ours or MMAction2's (default: best of the work dir)")
    parser.add_argument("--work-dir", help="run folder whose config.yaml and best checkpoint to use "
                                           "(default: the newest run in work_dirs/)")
    parser.add_argument("--class-names", help="class names in label order: one per line, 'name index' lines or "
                                              "JSON; lines that all end in a number are read as 'name index', "
                                              "so use JSON for names ending in digits (default: data.class_names)")
    parser.add_argument("--views", type=views_argument,
                        help="clips x crops per video, e.g. 10x3 (default: test.views)")
    parser.add_argument("--decoder", choices=("auto", "dali", "pyav"), default="auto",
                        help="auto: DALI where it can decode the codec on the device data.decode_device chooses, "
                             "else PyAV")
    parser.add_argument("--json", action="store_true", help="one JSON object per video instead of text")
    return parser.parse_args(argv)


def expand_videos(paths: list[str]) -> list[str]:
    """The videos to classify: each file as given, each folder replaced by the video files directly in it
    (VIDEO_EXTENSIONS, any case; sub-folders are not searched), sorted by name. A folder without one is a
    ListError; a path that does not exist stays, so it is reported as missing with the results."""
    videos = []
    for path in paths:
        folder = Path(path)
        if not folder.is_dir():
            videos.append(path)
            continue
        found = sorted(str(p) for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTENSIONS)
        if not found:
            raise ListError(f"{path}: a folder without videos (files ending in {', '.join(VIDEO_EXTENSIONS)} "
                            f"directly inside; sub-folders are not searched)")
        videos.extend(found)
    return videos


def dali_decode_device(decode_device: str, on_gpu: bool) -> str:
    """'gpu' or 'cpu': where the test loader decodes under data.decode_device on this machine (as VideoLoader)."""
    if decode_device == "gpu" and not on_gpu:
        raise ConfigError("data.decode_device=gpu needs a CUDA device; this machine has none "
                          "(use data.decode_device=cpu or auto)")
    return "gpu" if on_gpu and decode_device != "cpu" else "cpu"


def dali_reads(info: VideoInfo, decode_on: str, capability: tuple[int, int] | None = None,
               decode_device: str = "auto") -> bool:
    """Whether DALI decodes this video where it decodes (`decode_on`, from dali_decode_device): on the CPU the
    CPU_CODECS; on a GPU of compute `capability` what NVDEC takes (nvdec.py), and with data.decode_device=auto
    also the CPU_CODECS videos NVDEC refuses (the loader routes those to DALI's CPU decoder)."""
    if decode_on == "cpu":
        return info.codec in CPU_CODECS
    if nvdec_refusal(info.codec, info.profile, info.pix_fmt, info.width, info.height, capability,
                     hidden_frames=info.hidden_frames) is None:
        return True
    return decode_device == "auto" and info.codec in CPU_CODECS


def use_dali(info: VideoInfo, decoder: str, decode_on: str, capability: tuple[int, int] | None = None,
             decode_device: str = "auto") -> bool:
    """Whether DALI decodes this video: `--decoder auto` picks it where DALI reads it (dali_reads)."""
    if decoder == "auto":
        return dali_reads(info, decode_on, capability, decode_device)
    return decoder == "dali"


class DaliViews:
    """Test views of the videos DALI decodes, from one VideoLoader over all of them (one DALI pipeline, not one per
    video), each video decoded once, in the order given.

    The batches are taken one by one and never past the last: a DALI iterator that runs into the end of its epoch
    resets itself (auto_reset) and starts decoding the first videos again. A video DALI fails on ends that loader
    (the error names the file); the remaining videos get a new one.
    """

    def __init__(self, paths: list[str], data: DataConfig, views: tuple[int, int], num_classes: int,
                 device: torch.device, work: Path, dtype: torch.dtype | None, channels_last: bool):
        self.pending = list(paths)  # videos not yet handed out, in order
        self.data, self.views, self.num_classes, self.device = data, views, num_classes, device
        self.work, self.dtype, self.channels_last = work, dtype, channels_last
        self._batches = None
        self._skipped: dict[str, str] = {}

    def next_views(self, path: str) -> torch.Tensor:
        """(V, 3, T, H, W) test views of `path`, the next of the paths given."""
        if not self.pending or self.pending[0] != path:
            raise ValueError(f"DaliViews: asked for {path}, expected {self.pending[0] if self.pending else 'none'}")
        self.pending.pop(0)
        if self._batches is None:
            self._batches = self._start([path, *self.pending])
        resolved = str(Path(path).resolve())
        if resolved in self._skipped:
            raise LoaderError(f"{path}: {self._skipped[resolved]}")
        try:
            got, clips = next(self._batches)
        except (LoaderError, RuntimeError):
            self._batches = None  # DALI's pipeline is spent after an error
            raise
        if got != resolved:
            raise RuntimeError(f"DaliViews: the loader gave {got} where {resolved} was due")
        return clips

    def _start(self, paths: list[str]):
        list_file = self.work / f"dali_{len(list(self.work.iterdir()))}.txt"
        list_file.write_text("".join(f"{Path(p).resolve()} 0\n" for p in paths))
        cfg = DataConfig(**{**vars(self.data), "root": "", "test_list": str(list_file), "source_workers": 0})
        loader = VideoLoader(cfg, "test", batch_size=1, num_classes=self.num_classes, device_id=self.device.index,
                             views=self.views, dtype=self.dtype or torch.float32, channels_last=self.channels_last)
        self._skipped = dict(loader.skipped)
        return self._batches_of(loader)

    @staticmethod
    def _batches_of(loader: VideoLoader):
        batches = iter(loader)
        for _ in range(len(loader)):  # exactly one epoch: never ask for the batch after the last
            batch = next(batches)
            yield loader.records[int(batch.video_idx[0])].path, batch.clips


def dali_views(path: str, data: DataConfig, views: tuple[int, int], num_classes: int, device: torch.device,
               work: Path, dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    """(V, 3, T, H, W) test views of one video through the DALI test pipeline of evaluate.py, decoded once."""
    return DaliViews([path], data, views, num_classes, device, work, dtype, channels_last).next_views(path)


def progress_bar(total: int) -> tqdm:
    """A bar on stderr when there are more than a handful of videos (results stay alone on stdout)."""
    return tqdm(total=total, unit="video", file=sys.stderr, dynamic_ncols=True,
                disable=total <= PROGRESS_MIN_VIDEOS)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")  # stdout: results only
    log.setLevel(logging.INFO)  # predict's own lines (the checkpoint used); other modules' only from WARNING
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        videos = expand_videos(args.videos)
        cfg, checkpoint = resolve_run(args)
        cfg = apply_thread_budget(cfg, DistContext(device=device))
        num_clips, num_crops = parse_views(cfg.test.views)
        decode_on = dali_decode_device(cfg.data.decode_device, device.type == "cuda")
        capability = torch.cuda.get_device_capability(device) if decode_on == "gpu" else None
        names = class_names_or_indices(args.class_names or cfg.data.class_names, cfg.model.num_classes)
        model = build_model(cfg.model.depth, cfg.model.num_classes, cfg.model.base_channels, cfg.model.dropout)
        meta = load_checkpoint(model, checkpoint).get("meta", {})
    except (ConfigError, CheckpointError, ListError) as e:
        sys.exit(f"error: {e}")
    epoch = meta.get("epoch", "?") if isinstance(meta, dict) else "?"
    log.info("checkpoint %s (epoch %s), %s views", checkpoint, epoch, cfg.test.views)  # stderr, as all but results
    model, autocast_dtype, channels_last = inference_setup(model, cfg, device)
    infos: dict[str, VideoInfo | ProbeError] = {}
    for path in videos:
        try:
            infos[path] = info = probe_video(path)
            if args.decoder == "dali" and not dali_reads(info, decode_on, capability, cfg.data.decode_device):
                raise ProbeError(f"DALI cannot decode {info.codec} on the {decode_on.upper()} (data.decode_device="
                                 f"{cfg.data.decode_device}); use --decoder auto or pyav")
        except ProbeError as e:
            infos[path] = e
    on_dali = [path for path in videos if isinstance(infos[path], VideoInfo)
               and use_dali(infos[path], args.decoder, decode_on, capability, cfg.data.decode_device)]
    failures = 0
    with tempfile.TemporaryDirectory(prefix="predict_") as work, progress_bar(len(videos)) as bar:
        dali = DaliViews(on_dali, cfg.data, (num_clips, num_crops), cfg.model.num_classes, device, Path(work),
                         autocast_dtype, channels_last)
        for path in videos:
            info = infos[path]
            try:
                if isinstance(info, ProbeError):
                    raise info
                if dali.pending and dali.pending[0] == path:
                    clips = dali.next_views(path)
                else:
                    clips = eval_views(path, info, info.num_frames, cfg.data.clip_len, cfg.data.frame_interval,
                                       num_clips, num_crops, cfg.data.short_side, cfg.data.test_crop)
                with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype,
                                                            enabled=autocast_dtype is not None):
                    probs = average_views(model(clips.to(device)), num_clips * num_crops)[0].cpu()
            except (ProbeError, LoaderError, RuntimeError) as e:
                if isinstance(e, UnreadableVideo):  # predict's video index is temporary: no "rerun skips it" hint
                    message = f"{path}: {e.reason}"
                else:
                    message = str(e) if str(e).startswith(path) else f"{path}: {e}"
                tqdm.write(f"error: {message}", file=sys.stderr)
                failures += 1
                bar.update()
                continue
            top = probs.topk(min(TOP_K, len(probs)))
            ranked = [{"class": names[i], "index": i, "probability": round(p, 6)}
                      for p, i in zip(top.values.tolist(), top.indices.tolist())]
            if args.json:
                tqdm.write(json.dumps({"video": path, "top5": ranked}), file=sys.stdout)
            else:
                tqdm.write(f"{path}: " + ", ".join(f"{r['class']} {r['probability']:.3f}" for r in ranked),
                           file=sys.stdout)
            bar.update()
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
