"""The one configuration schema shared by train.py, evaluate.py and the tools.

A run is described by a YAML file in configs/ with four sections (data, model, train, test), each mapped
onto a dataclass below, plus `--set section.key=value` overrides from the command line. Values are parsed
as YAML scalars and must have the field's type; an unknown key, a wrong type, a missing file or a value
that breaks a cross-key rule raises ConfigError with one line that says where and what. YAML is read with
`yaml.safe_load` semantics: a config file is data, never code.

    python config.py k400_8x8x1.yaml --set train.lr=0.02     # print the resolved config as YAML
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message is one line meant for the user."""


@dataclass
class DataConfig:
    root: str = ""  # folder the video paths of the list files are relative to
    val_root: str = ""  # folder of the val list's videos, when not data.root (MMAction2 keeps videos_val apart)
    test_root: str = ""  # folder of the test list's videos, when not data.root
    train_list: str = ""  # training list: '<video path> <label>' per line
    val_list: str = ""  # list for per-epoch validation (1 clip x 1 centre crop)
    test_list: str = ""  # list for evaluate.py (test.views per video)
    class_names: str = ""  # optional class-name file in label order (lines ending in a number: 'name index')
    clip_len: int = 8  # frames per clip (MMAction2 SampleFrames clip_len)
    frame_interval: int = 8  # temporal stride between sampled frames, in frames
    num_clips: int = 1  # clips per video per training sample
    short_side: int = 256  # frames are resized so their short side has this many pixels
    train_crop: int = 224  # RandomResizedCrop output side, in pixels; may exceed short_side (the box is upscaled)
    val_crop: int = 224  # CenterCrop side used for validation, in pixels
    test_crop: int = 256  # ThreeCrop / CenterCrop side used by evaluate.py, in pixels
    decode_device: str = "auto"  # where video is decoded: auto (gpu when CUDA is there), gpu (NVDEC), cpu
    num_threads: int = 0  # DALI CPU worker threads per process; 0: auto (runtime.apply_thread_budget)
    prefetch_batches: int = 2  # batches DALI prepares ahead of the training step
    source_workers: int = 0  # processes cutting video segments for DALI; 0: in the training process
    decode_pipelines: int = 0  # DALI pipelines per process, batch k from pipeline k mod P; 0: 1 on CPU, 4 on GPU
    index_dir: str = ""  # folder of the lists' video indexes (probe results); '': beside each list file


@dataclass
class ModelConfig:
    depth: int = 34  # ResNet(2+1)D depth: 18 or 34
    base_channels: int = 64  # width of the first stage; 64 is the published model
    num_classes: int = 400  # classifier outputs
    dropout: float = 0.5  # dropout before the classifier, training only
    sync_bn: bool = True  # SyncBatchNorm for the BN after each (2+1)D conv in multi-process runs
    compile: bool = False  # wrap the model in torch.compile


@dataclass
class TrainConfig:
    epochs: int = 180  # total training epochs
    batch_size: int = 8  # clips per GPU (per process) per step
    lr: float = 0.01  # SGD learning rate for a total batch of 64 (see --auto-scale-lr)
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 1e-4  # L2 penalty on all parameters
    clip_grad: float = 40.0  # max global L2 norm of the gradient; 0 disables clipping
    val_interval: int = 20  # validate every this many epochs (and after the last)
    amp: str = "bf16"  # mixed precision on a GPU: bf16, fp16 (with a grad scaler) or none
    channels_last: bool = True  # channels_last_3d memory format on a GPU
    log_interval: int = 20  # iterations between progress lines
    checkpoint_interval: int = 10  # keep an extra numbered checkpoint every this many epochs; 0: none
    checkpoint_every_iters: int = 500  # latest.pth every this many iterations within an epoch too; 0: epoch ends only
    fused_optimizer: str = "auto"  # SGD step: auto (PyTorch fused on a GPU, plain on CPU), torch, apex (FusedSGD), none
    seed: int = 0  # base seed of sampling, augmentation and initialisation


@dataclass
class TestConfig:
    views: str = "10x3"  # clips x crops per video, e.g. 10x3 or 1x1
    batch_size: int = 1  # whole videos per batch (each expands to clips x crops views)
    amp: str = "bf16"  # autocast dtype for inference on a GPU: bf16, fp16 or none (fp32, as MMAction2 tests)
    log_interval: int = 0  # batches between progress lines of evaluate.py; 0: a line about every 10 s


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)


SECTIONS = {f.name: f.default_factory for f in dataclasses.fields(Config)}
DECODE_DEVICES = ("auto", "gpu", "cpu")
AMP_MODES = ("bf16", "fp16", "none")
FUSED_OPTIMIZERS = ("auto", "torch", "apex", "none")
DEPTHS = (18, 34)
VIEWS_PATTERN = re.compile(r"^([0-9]+)x([0-9]+)$")


def parse_views(views: str, name: str = "test.views") -> tuple[int, int]:
    """`'10x3'` -> (num_clips, num_crops); clips >= 1, crops 1 (centre) or 3 (ThreeCrop). `name` is what the
    error calls the value (the config key, or `--views`)."""
    match = VIEWS_PATTERN.match(views.strip())
    problem = "not two whole numbers joined by 'x'"
    if match is not None:
        clips, crops = int(match.group(1)), int(match.group(2))
        if clips >= 1 and crops in (1, 3):
            return clips, crops
        problem = "clips must be >= 1" if clips < 1 else f"crops must be 1 or 3, not {crops}"
    raise ConfigError(f"{name}: expected '<clips>x<crops>' with crops 1 or 3 (e.g. 10x3), got '{views}': {problem}")


def views_argument(text: str) -> str:
    """argparse type of `--views`: the text checked as NxM and normalised, kept a string (as a `--set` YAML
    value, `0x3` would become the hexadecimal integer 3)."""
    try:
        clips, crops = parse_views(text, name="--views")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--views: ")) from None
    return f"{clips}x{crops}"


def views_override(views: str) -> str:
    """The `--set` item of a checked `--views` value, quoted so YAML reads a string."""
    return f"test.views='{views}'"


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or a bare name looked up in configs/ (`k400_8x8x1.yaml`)."""
    given = Path(path)
    if given.is_file():
        return given
    for candidate in (CONFIG_DIR / given, CONFIG_DIR / f"{given}.yaml"):
        if not given.is_absolute() and candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.name for p in CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"{path}: no such config file (the ones in {CONFIG_DIR.name}/: {names})")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Reads a YAML config (or starts from the defaults when path is None) and applies `key=value` overrides."""
    if path is None:
        return _build({}, "defaults", overrides)
    path = resolve_config_path(path)
    return _build(_read_yaml(path), str(path), overrides)


def config_from_dict(values: dict[str, Any], where: str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Rebuilds a Config from `config_to_dict` output (e.g. stored in a checkpoint), with the same checks."""
    return _build(_flatten(values, where), where, overrides)


def _build(flat_values: dict[str, Any], where: str, overrides: list[str] | tuple[str, ...]) -> Config:
    cfg = Config()
    for key, value in flat_values.items():
        _assign(cfg, key, value, where)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. --set train.lr=0.02")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item}: value is not a YAML scalar ({_first_line(e)})") from e
        _assign(cfg, key.strip(), value, where="--set")
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Cross-key and range checks; every rule about values lives here, not deep inside training."""
    positive = [
        "data.clip_len", "data.frame_interval", "data.num_clips", "data.short_side", "data.train_crop",
        "data.val_crop", "data.test_crop", "data.prefetch_batches",
        "model.base_channels", "model.num_classes", "train.epochs", "train.batch_size",
        "train.val_interval", "train.log_interval", "test.batch_size",
    ]
    for key in positive:
        if get_value(cfg, key) <= 0:
            raise ConfigError(f"{key}: must be positive, got {get_value(cfg, key)}")
    non_negative = ["data.num_threads", "data.source_workers", "data.decode_pipelines", "train.lr", "train.momentum",
                    "train.weight_decay", "train.clip_grad", "train.checkpoint_interval",
                    "train.checkpoint_every_iters", "test.log_interval"]
    for key in non_negative:
        if get_value(cfg, key) < 0:
            raise ConfigError(f"{key}: must be >= 0, got {get_value(cfg, key)}")
    if not 0.0 <= cfg.model.dropout < 1.0:
        raise ConfigError(f"model.dropout: must be in [0, 1), got {cfg.model.dropout}")
    choices = {"data.decode_device": DECODE_DEVICES, "train.amp": AMP_MODES, "model.depth": DEPTHS,
               "train.fused_optimizer": FUSED_OPTIMIZERS, "test.amp": AMP_MODES}
    for key, allowed in choices.items():
        if get_value(cfg, key) not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}, got {get_value(cfg, key)!r}")
    parse_views(cfg.test.views)
    # Only the fixed crops must fit in the short-side-resized frame. RandomResizedCrop (data.train_crop) picks its
    # box inside the frame and resizes the box to train_crop, so train_crop > short_side upscales, as in MMAction2.
    for key in ("data.val_crop", "data.test_crop"):
        if get_value(cfg, key) > cfg.data.short_side:
            raise ConfigError(f"{key}: crop {get_value(cfg, key)} is larger than data.short_side "
                              f"{cfg.data.short_side}; a fixed crop must fit in the resized frame")


def get_value(cfg: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(cfg, section), name)


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def format_config(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(format_config(cfg))


def add_config_arguments(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    """The `--config` and `--set` flags every command shares."""
    parser.add_argument("--config", required=config_required,
                        help="YAML config: a path, or a file name in configs/ (e.g. k400_32x2x1.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set train.lr=0.02 (repeatable)")


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_first_line(e)})") from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from e
    if tree is None:
        return {}
    return _flatten(tree, str(path))


def _flatten(tree: Any, where: str) -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise ConfigError(f"{where}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(tree).__name__}")
    flat = {}
    for section, values in tree.items():
        if section not in SECTIONS:
            raise ConfigError(f"{where}: unknown section '{section}'{_suggest(str(section), SECTIONS)}; "
                              f"valid sections: {', '.join(SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping of keys, got {type(values).__name__}")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def _assign(cfg: Config, key: str, value: Any, where: str) -> None:
    section, dot, name = key.partition(".")
    if section not in SECTIONS or not dot:
        raise ConfigError(f"{where}: unknown key '{key}'{_suggest(key, all_keys())}; "
                          f"keys look like SECTION.NAME with sections {', '.join(SECTIONS)}")
    fields = {f.name: f for f in dataclasses.fields(SECTIONS[section]())}
    if name not in fields:
        raise ConfigError(f"{where}: unknown key '{key}'{_suggest(name, fields, prefix=section + '.')}; "
                          f"valid keys of '{section}': {', '.join(fields)}")
    expected = type(getattr(getattr(cfg, section), name))
    setattr(getattr(cfg, section), name, _coerce(key, value, expected, where))


def _coerce(key: str, value: Any, expected: type, where: str) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (expected is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{where}: {key} must be {expected.__name__}, got {type(value).__name__} {value!r}")


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, factory in SECTIONS.items() for f in dataclasses.fields(factory())]


def _suggest(name: str, candidates, prefix: str = "") -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key written twice in one mapping instead of silently keeping the last."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Print a resolved config as YAML.")
    parser.add_argument("config", help="YAML config: a path, or a file name in configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    try:
        print(format_config(load_config(args.config, args.overrides)), end="")
    except ConfigError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
