"""Loading model weights from this project's checkpoints and from MMAction2 checkpoint files, unchanged.

Both are a dict with `state_dict` (keys `backbone.…`, `cls_head.…`) and `meta`; a bare state dict is accepted
too. Files are read with `torch.load(weights_only=True)`: a checkpoint is data, never code.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Plain numpy values (a seed, a metric) may sit in a checkpoint's `meta`; these rebuild only arrays and scalars.
_NUMPY_SAFE_GLOBALS = [np.dtype, np.ndarray, np._core.multiarray._reconstruct, np._core.multiarray.scalar,
                       *{type(np.dtype(t)) for t in ("f4", "f8", "i4", "i8", "u1", "b1")}]
_SHOWN_KEYS = 3
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message is one line naming the file."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict of a file (a bare state dict is wrapped as {'state_dict': ...})."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"{path}: not a checkpoint: empty file (0 bytes)")
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):  # torch.save's zip archive, or a legacy pickle
        raise CheckpointError(f"{path}: not a PyTorch checkpoint file (neither torch.save's zip archive nor a "
                              f"pickle); pass a .pth file train.py or MMAction2 saved")
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. torch's note on the pickle protocol of a file that is no checkpoint
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text suggests weights_only=False, which would run whatever code the file holds: never pass it on.
        found = _UNSUPPORTED_GLOBAL.search(str(e))
        what = f"a Python object ({found.group(1)})" if found else "pickled data that is not tensors and plain values"
        raise CheckpointError(f"{path}: not a checkpoint: it holds {what}, and checkpoints are read as data only "
                              f"(tensors, numbers, strings, lists, dicts); use a checkpoint train.py or MMAction2 "
                              f"saved") from None
    except Exception as e:  # torch raises many types for a damaged file; all mean the same to the user
        reason = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {reason})") from e
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(ckpt).__name__}, expected a dict)")
    if "state_dict" not in ckpt:
        if not ckpt or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise CheckpointError(f"{path}: not a checkpoint (no 'state_dict' and not a dict of tensors)")
        ckpt = {"state_dict": ckpt}
    if not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(ckpt['state_dict']).__name__}, expected a dict")
    return ckpt


def model_state_from_checkpoint(state_dict: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Drops what the recognizer does not own: a DDP `module.` prefix and `data_preprocessor.*` buffers."""
    state = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if not key.startswith("data_preprocessor."):
            state[key] = value
    return state


def load_checkpoint(module: nn.Module, path: str | Path) -> dict[str, Any]:
    """Loads the weights of `path` into `module` (strict) and returns the whole checkpoint dict.

    Raises CheckpointError naming the file and the first missing, unexpected and shape-mismatched keys.
    """
    ckpt = read_checkpoint(path)
    state = model_state_from_checkpoint(ckpt["state_dict"])
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {list(getattr(state[k], 'shape', []))} vs model {list(expected[k].shape)}"
        for k in expected
        if k in state and (not isinstance(state[k], torch.Tensor) or state[k].shape != expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [_listing(name, keys) for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched)) if keys]
        raise CheckpointError(f"{path}: does not fit the model: {'; '.join(parts)} "
                              f"(check model.depth, model.num_classes and model.base_channels)")
    module.load_state_dict(state, strict=True)
    return ckpt


def _listing(name: str, keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    more = f", … {len(keys) - _SHOWN_KEYS} more" if len(keys) > _SHOWN_KEYS else ""
    return f"{len(keys)} {name} key{'s' if len(keys) != 1 else ''} ({shown}{more})"
