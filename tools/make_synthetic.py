"""Synthetic video data sets, encoded with PyAV: the demo's motion classes, K400-like clips, index-coded test clips.

    python tools/make_synthetic.py motion --out data/demo --seed 0          # the set `make demo` trains on
    python tools/make_synthetic.py k400like --out data/k400like --num 32 --codec h264 --gop 250
    python tools/make_synthetic.py k400like --out data/k400vp9 --num 16 --codec vp9 --gop 128

Each set is a folder with the videos, MMAction2-style list files (`<relative path> <label>` per line) and a
class-name file, ready for `data.root` / `data.train_list` / `data.val_list` / `data.class_names`.

- motion: a textured square on a textured background moves up, moves down, grows or shrinks (the four classes);
  one frame alone cannot tell them apart, so a model has to use time, and a horizontal flip (part of the training
  recipe) keeps every class what it is. Textures, colours, sizes, speeds and positions are drawn from `--seed`, so
  another seed gives a differently generated set of the same task.
- k400like: about 10 s at 30 fps, 340x256, panning noise texture with moving blobs, a keyframe every `--gop`
  frames: the shape and bitrate of a Kinetics-400 download, for loader benchmarks.
- index-coded clips (tests): every pixel of frame i has a colour that encodes i (`index_colour`), which survives
  lossy coding, resizing, cropping and flipping, so a test can read back which frames a pipeline delivered.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

CODECS = {  # codec name -> (PyAV encoder, file extension)
    "vp9": ("libvpx-vp9", ".webm"),
    "h264": ("libx264", ".mp4"),
    "hevc": ("libx265", ".mp4"),
    "mjpeg": ("mjpeg", ".avi"),
}
MOTION_CLASSES = ("moving_up", "moving_down", "growing", "shrinking")
INDEX_LEVELS = 8  # per colour channel; 8**3 = 512 distinct frame indices
INDEX_STEP = 256 // INDEX_LEVELS


class VideoWriter:
    """Encodes RGB uint8 frames (H, W, 3) one at a time, a keyframe every `gop` frames (encoder default: None).

    `quality` is the CRF of VP9/H.264/HEVC (lower is better); 4:2:0 codecs need even width and height.
    `container` forces the file format (e.g. 'webm' for a temporary name without the right extension).
    """

    def __init__(self, path: str | Path, width: int, height: int, fps: float = 30, codec: str = "vp9",
                 gop: int | None = None, quality: int = 30, container: str | None = None):
        encoder, _ = CODECS[codec]
        options = {}
        if codec == "vp9":
            options = {"deadline": "realtime", "cpu-used": "8", "crf": str(quality), "b:v": "0", "row-mt": "1"}
        elif codec in ("h264", "hevc"):
            options = {"preset": "veryfast", "crf": str(quality)}
        if gop is not None:
            options.update({"g": str(gop), "keyint_min": str(gop)})
            if codec == "h264":
                options["sc_threshold"] = "0"  # keyframes exactly every gop frames, not at detected scene cuts
            elif codec == "hevc":
                options["x265-params"] = f"keyint={gop}:min-keyint={gop}:scenecut=0:log-level=error"
        rate = Fraction(fps).limit_denominator(1001)
        self.container = av.open(str(path), "w", format=container)
        self.stream = self.container.add_stream(encoder, rate=rate, options=options)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        self.stream.time_base = 1 / rate
        self.frames = 0

    def write(self, frame: np.ndarray | av.VideoFrame) -> None:
        if isinstance(frame, np.ndarray):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        frame.pts = self.frames
        self.container.mux(self.stream.encode(frame))
        self.frames += 1

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))
        self.container.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.container.close()


def write_video(path: str | Path, frames_thwc: np.ndarray, fps: int = 30, codec: str = "vp9",
                gop: int | None = None, quality: int = 30) -> Path:
    """Encodes RGB uint8 frames (T, H, W, 3) into `path` (see VideoWriter)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _, height, width, _ = frames_thwc.shape
    with VideoWriter(path, width, height, fps, codec, gop, quality) as writer:
        for frame in frames_thwc:
            writer.write(frame)
    return path


def encode_clip(path: str | Path, frames_thwc: np.ndarray, encoder: str, pix_fmt: str = "yuv420p",
                options: dict | None = None, bit_rate: int | None = None) -> Path:
    """Encodes RGB uint8 frames (T, H, W, 3) with any PyAV encoder and its options (the container from the suffix of
    `path`), one frame per pts at 30 fps: for the clip kinds VideoWriter's presets do not make (AV1, VP8, 10-bit
    H.264, libvpx alt-ref frames, which it places in one pass only with a VBR `bit_rate`)."""
    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(encoder, rate=30, options=options or {})
        stream.width, stream.height, stream.pix_fmt = frames_thwc.shape[2], frames_thwc.shape[1], pix_fmt
        if bit_rate:
            stream.bit_rate = bit_rate
        for pts, rgb in enumerate(frames_thwc):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format=pix_fmt)
            frame.pts = pts
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def index_colour(index: int) -> tuple[int, int, int]:
    """The RGB colour that encodes frame `index` (0..511): one of 8 well-separated levels per channel."""
    if not 0 <= index < INDEX_LEVELS**3:
        raise ValueError(f"frame index {index} cannot be colour-coded (0..{INDEX_LEVELS**3 - 1})")
    digits = (index % INDEX_LEVELS, index // INDEX_LEVELS % INDEX_LEVELS, index // INDEX_LEVELS**2)
    return tuple(INDEX_STEP // 2 + INDEX_STEP * d for d in digits)


def read_index(rgb: np.ndarray) -> int:
    """The frame index coded in an RGB frame or crop (..., 3), read from its mean colour."""
    mean = rgb.reshape(-1, 3).astype(np.float64).mean(axis=0)
    digits = np.clip(np.floor(mean / INDEX_STEP), 0, INDEX_LEVELS - 1).astype(int)
    return int(digits[0] + INDEX_LEVELS * digits[1] + INDEX_LEVELS**2 * digits[2])


def index_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8 frames, frame i filled with index_colour(i)."""
    colours = np.array([index_colour(i) for i in range(num_frames)], dtype=np.uint8)
    return np.broadcast_to(colours[:, None, None, :], (num_frames, height, width, 3)).copy()


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: coarse random colours bilinearly upsampled, a cheap natural-looking texture."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.random((gh, gw, 3), dtype=np.float32)
    ys = np.linspace(0, gh - 1.001, height, dtype=np.float32)
    xs = np.linspace(0, gw - 1.001, width, dtype=np.float32)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = grid[y0][:, x0] * (1 - fx) + grid[y0][:, x0 + 1] * fx
    bottom = grid[y0 + 1][:, x0] * (1 - fx) + grid[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def motion_frames(label: int, rng: np.random.Generator, num_frames: int = 32, height: int = 64,
                  width: int = 84) -> np.ndarray:
    """(T, H, W, 3) uint8: a bright textured square on a dim textured background that moves up, moves down, grows
    or shrinks (label 0..3). No single frame tells the classes apart, and a horizontal flip (part of the training
    recipe) keeps every class what it is. Landscape, as Kinetics-400's videos (84/64 is about their 340/256), so
    ThreeCrop's left, right and middle crops of the short side differ."""
    background = 0.25 + 0.3 * _smooth_noise(rng, height, width, cell=int(rng.integers(6, 14)))
    colour = 0.55 + 0.45 * rng.random(3, dtype=np.float32)
    sprite_texture = _smooth_noise(rng, height, height, cell=4)
    speed = rng.uniform(1.0, 1.4)  # pixels per frame
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    if label in (0, 1):  # vertical motion, the free x drawn at random
        side = int(rng.integers(10, 17))
        travel = speed * (num_frames - 1)
        x = int(rng.integers(0, width - side + 1))
        y_first = rng.uniform(travel, height - side) if label == 0 else rng.uniform(0, height - side - travel)
        sides = [side] * num_frames
        corners = [(y_first + (-speed if label == 0 else speed) * t, x) for t in range(num_frames)]
    else:  # growing or shrinking about a random centre
        small, large = int(rng.integers(6, 11)), int(rng.integers(26, 33))
        cy = rng.uniform(large / 2, height - large / 2)
        cx = rng.uniform(large / 2, width - large / 2)
        sides = np.linspace(small, large, num_frames) if label == 2 else np.linspace(large, small, num_frames)
        corners = [(cy - s / 2, cx - s / 2) for s in sides]
    for t, (side, (y, x)) in enumerate(zip(sides, corners)):
        canvas = background.copy()
        side = int(round(side))
        y = int(round(np.clip(y, 0, height - side)))
        x = int(round(np.clip(x, 0, width - side)))
        canvas[y:y + side, x:x + side] = colour * (0.7 + 0.3 * sprite_texture[:side, :side])
        frames[t] = (canvas * 255).astype(np.uint8)
    return frames


def k400like_frames(rng: np.random.Generator, num_frames: int = 300, height: int = 256, width: int = 340) -> np.ndarray:
    """(T, H, W, 3) uint8: a panning noise texture with moving blobs, so an encoder spends a realistic bitrate."""
    texture = _smooth_noise(rng, height + num_frames, width + num_frames, cell=8)
    texture = 0.7 * texture + 0.3 * rng.random(texture.shape, dtype=np.float32)
    blobs = [(rng.uniform(0, width), rng.uniform(0, height), rng.uniform(-3, 3), rng.uniform(-3, 3),
              rng.uniform(15, 40), rng.random(3)) for _ in range(4)]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        canvas = texture[t // 2:t // 2 + height, t:t + width].copy()
        for x0, y0, vx, vy, radius, colour in blobs:
            cx, cy = (x0 + vx * t) % width, (y0 + vy * t) % height
            mask = ((xx - cx) ** 2 + (yy - cy) ** 2 < radius**2)[..., None]
            canvas = np.where(mask, colour.astype(np.float32), canvas)
        frames[t] = (canvas * 255).astype(np.uint8)
    return frames


def _write_motion_video(job: tuple) -> str:
    path, label, seed, codec = job
    write_video(path, motion_frames(label, np.random.default_rng(seed)), fps=15, codec=codec)
    return str(path)


def _write_k400like_video(job: tuple) -> str:
    path, seed, codec, gop, num_frames = job
    write_video(path, k400like_frames(np.random.default_rng(seed), num_frames), fps=30, codec=codec, gop=gop,
                quality=28)
    return str(path)


def make_motion_set(out: str | Path, seed: int = 0, train_per_class: int = 80, val_per_class: int = 20,
                    codec: str = "vp9", workers: int = 2) -> Path:
    """Writes the demo set: videos/, train_list.txt, val_list.txt, class_names.txt under `out`."""
    out = Path(out)
    extension = CODECS[codec][1]
    splits = {"train": train_per_class, "val": val_per_class}
    jobs, lists = [], {}
    for split_index, (split, per_class) in enumerate(splits.items()):
        lines = []
        for label, name in enumerate(MOTION_CLASSES):
            for i in range(per_class):
                relative = f"videos/{split}/{name}_{i:03d}{extension}"
                video_seed = [seed, split_index, label, i]
                jobs.append((out / relative, label, np.random.SeedSequence(video_seed).generate_state(1)[0], codec))
                lines.append(f"{relative} {label}")
        lists[split] = lines
    _run_jobs(_write_motion_video, jobs, workers)
    for split, lines in lists.items():
        (out / f"{split}_list.txt").write_text("\n".join(lines) + "\n")
    (out / "class_names.txt").write_text("\n".join(MOTION_CLASSES) + "\n")
    (out / "dataset.json").write_text(json.dumps({"kind": "motion", "seed": seed, "codec": codec,
                                                  "train_per_class": train_per_class,
                                                  "val_per_class": val_per_class}) + "\n")
    return out


def make_k400like_set(out: str | Path, num: int, codec: str = "h264", gop: int | None = 250, seed: int = 0,
                      num_classes: int = 4, num_frames: int = 300, workers: int = 2) -> Path:
    """Writes `num` K400-like clips under `out`/videos with train_list.txt, val_list.txt (the same clips) and class_names.txt."""
    out = Path(out)
    extension = CODECS[codec][1]
    jobs, lines = [], []
    for i in range(num):
        relative = f"videos/clip_{i:04d}{extension}"
        jobs.append((out / relative, int(np.random.SeedSequence([seed, i]).generate_state(1)[0]), codec, gop,
                     num_frames))
        lines.append(f"{relative} {i % num_classes}")
    _run_jobs(_write_k400like_video, jobs, workers)
    for split in ("train", "val"):
        (out / f"{split}_list.txt").write_text("\n".join(lines) + "\n")
    (out / "class_names.txt").write_text("\n".join(f"class_{c}" for c in range(num_classes)) + "\n")
    return out


def _run_jobs(function, jobs: list, workers: int) -> None:
    if workers <= 1:
        for job in jobs:
            function(job)
        return
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(function, jobs, chunksize=4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    motion = sub.add_parser("motion", help="the demo's four motion classes")
    motion.add_argument("--out", required=True, help="output folder")
    motion.add_argument("--seed", type=int, default=0, help="draws every video; another seed, another data set")
    motion.add_argument("--train-per-class", type=int, default=80, help="training videos per class")
    motion.add_argument("--val-per-class", type=int, default=20, help="validation videos per class")
    motion.add_argument("--codec", choices=sorted(CODECS), default="vp9", help="vp9 decodes on CPU and GPU")
    motion.add_argument("--workers", type=int, default=2, help="encoding processes")
    k400 = sub.add_parser("k400like", help="10 s 340x256 30 fps clips shaped like Kinetics-400 downloads")
    k400.add_argument("--out", required=True, help="output folder")
    k400.add_argument("--num", type=int, default=16, help="number of clips")
    k400.add_argument("--codec", choices=sorted(CODECS), default="h264", help="h264 needs a GPU to decode with DALI")
    k400.add_argument("--gop", type=int, default=250, help="frames between keyframes (x264's default is 250)")
    k400.add_argument("--frames", type=int, default=300, help="frames per clip (30 fps)")
    k400.add_argument("--seed", type=int, default=0, help="draws the clips")
    k400.add_argument("--workers", type=int, default=2, help="encoding processes")
    args = parser.parse_args(argv)
    if args.kind == "motion":
        out = make_motion_set(args.out, args.seed, args.train_per_class, args.val_per_class, args.codec, args.workers)
    else:
        out = make_k400like_set(args.out, args.num, args.codec, args.gop, args.seed, num_frames=args.frames,
                                workers=args.workers)
    print(f"wrote {args.kind} set to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
