"""What NVDEC (the GPU's video decoder, DALI's `mixed` backend) takes, decided per video at start-up.

NVDEC refuses codecs, profiles and frame sizes its hardware lacks ("Video is too small", "Codec configuration not
supported"), and which ones depends on the GPU generation. Deciding from the probe (codec, profile, pixel format,
size) before the first batch lets the loader send those videos to DALI's CPU decoder (VP8/VP9/MJPEG) or stop with
one clear line, instead of failing mid-epoch on a video PyAV decodes fine.

Sources, and how sure each number is:
- Which codec/profile each GPU generation decodes: NVIDIA Video Codec SDK 13.0, NVDEC Application Note, table
  "NVDEC Hardware Capabilities" (docs.nvidia.com/video-technologies/video-codec-sdk/13.0/nvdec-application-note/):
  H.264 Baseline/Main/High on all; H.264 High10/High422 and 8192x8192 only on Blackwell; HEVC Main/Main10 from
  (select) 2nd-gen Maxwell, HEVC 4:4:4 from Turing, HEVC 4:2:2 10/12-bit only on Blackwell; VP9 profile 0 from
  (select) 2nd-gen Maxwell; VP8 from 2nd-gen Maxwell; AV1 Main only on GA10x (Ampere except GA100), Ada and
  Blackwell — none on Turing, A100 (GA100) or Hopper (H100/H200). "Select GPUs" columns are taken from Pascal on.
- Minimum and maximum frame sizes: NVDEC Video Decoder API Programming Guide, table "Hardware Video Decoder
  Capabilities" (same SDK). H.264 48x16 .. 4096x4096, HEVC 144x144 .. 8192x8192, VP8 48x16 .. 4096x4096;
  VP9 and AV1 128x128 .. 8192x8192. The HEVC minimum is the one we are sure of; VP9's and AV1's 128x128 are
  believed right but not checked against the table here (no GPU to ask cuvidGetDecoderCaps, whose
  nMinWidth/nMinHeight are the authority), nor is the H.264/VP8 48x16.
- MJPEG: the application note lists no (M)JPEG decoding; we treat it as not taken, so `auto` decodes MJPEG on
  the CPU (uncertain: DALI may decode it on the GPU through another path).
- Bit depth and chroma beyond the above (VP9 profiles 1-3, AV1 4:4:4) are treated as refused: not in the note.
- VP9 with hidden (alt-ref) frames, i.e. superframes that decode a frame they do not show (VideoInfo.hidden_frames):
  treated as refused until benchmarks/gpu_suite.py's decode step shows, on a GPU, that DALI's `mixed` decoder
  numbers such a file's frames as its CPU decoder does (one frame per packet). Nothing in the table says NVDEC
  refuses them; what is unproven is the numbering: DALI's GPU path takes the pictures NVDEC's parser hands out,
  and whether a hidden picture is skipped there has not been run. YouTube-derived WebM files (Kinetics) carry
  such frames; our test clips do not.
"""

from __future__ import annotations

import re
from typing import NamedTuple

# Compute capability (major, minor) -> the application note's GPU columns
_GA10X_ADA = {(8, 6), (8, 7), (8, 9)}  # Ampere except GA100 (8.0), and Ada


def generation(capability: tuple[int, int]) -> str:
    """The application note's column for a compute capability."""
    major, minor = capability
    if major >= 10:
        return "Blackwell"
    if capability in _GA10X_ADA:
        return "Ampere GA10x/Ada"
    if capability >= (7, 5):
        return {(7, 5): "Turing", (8, 0): "A100 (GA100)", (9, 0): "Hopper"}.get(capability, "Turing/GA100/Hopper")
    if major == 7:
        return "Volta"
    if major == 6:
        return "Pascal"
    return "Maxwell or older"


class PixelFormat(NamedTuple):
    bit_depth: int
    chroma: str  # '420', '422', '444' or '400' (grey)


def pixel_format(pix_fmt: str) -> PixelFormat | None:
    """Bit depth and chroma subsampling of an FFmpeg pixel format name; None when we cannot tell."""
    if pix_fmt in ("nv12", "gray"):
        return PixelFormat(8, "420" if pix_fmt == "nv12" else "400")
    match = re.fullmatch(r"yuvj?(420|422|444)p(\d+)?(le|be)?", pix_fmt or "")
    if match is None:
        return None
    return PixelFormat(int(match.group(2) or 8), match.group(1))


# codec -> (min width, min height, max width, max height before Blackwell); see the module docstring
_SIZES = {"h264": (48, 16, 4096, 4096), "hevc": (144, 144, 8192, 8192), "vp8": (48, 16, 4096, 4096),
          "vp9": (128, 128, 8192, 8192), "av1": (128, 128, 8192, 8192)}


def nvdec_refusal(codec: str, profile: str, pix_fmt: str, width: int, height: int,
                  capability: tuple[int, int], *, hidden_frames: int = 0) -> str | None:
    """Why NVDEC on a GPU of `capability` would refuse this video, or None when it takes it.

    `hidden_frames`: frames the packets decode but do not show (probe.VideoInfo.hidden_frames; -1 unknown); it
    matters for VP9 only, the one codec whose superframes the probe counts them in.
    """
    gen = generation(capability)
    if codec not in _SIZES:
        return f"NVDEC does not decode {codec}"
    if codec == "vp9" and hidden_frames < 0:
        return ("VP9 whose hidden (alt-ref) frames are not known: probed by an older version (its probe cache was "
                "converted; to probe again, delete the list's .index and its old .probe.json); NVDEC's frame "
                "numbering of VP9 with hidden frames is unproven")
    if codec == "vp9" and hidden_frames > 0:
        return f"VP9 with {hidden_frames} hidden (alt-ref) frames: NVDEC's frame numbering of those is unproven"
    fmt = pixel_format(pix_fmt)
    if fmt is None:
        return f"pixel format {pix_fmt or 'unknown'} not in NVDEC's table"
    blackwell = capability[0] >= 10
    if capability < (6, 0) and codec in ("hevc", "vp8", "vp9"):
        return f"{codec} needs NVDEC of Pascal or newer, this GPU is {gen}"
    if codec == "av1" and not (blackwell or capability in _GA10X_ADA):
        return f"no AV1 decoding on {gen} (NVDEC has it on Ampere GA10x, Ada and Blackwell)"
    if codec == "h264":
        if fmt.chroma == "444" or (not blackwell and (fmt.bit_depth > 8 or fmt.chroma == "422")):
            return (f"H.264 {profile or ''} {fmt.bit_depth}-bit {fmt.chroma} not decoded on {gen} (8-bit 4:2:0 "
                    f"only; 10-bit and 4:2:2 from Blackwell)").replace("  ", " ")
    elif codec == "hevc":
        if fmt.chroma == "422" and not blackwell:
            return f"HEVC 4:2:2 not decoded on {gen} (from Blackwell)"
        if fmt.chroma == "444" and capability < (7, 5):
            return f"HEVC 4:4:4 not decoded on {gen} (from Turing)"
        if fmt.bit_depth > 12:
            return f"HEVC {fmt.bit_depth}-bit not decoded by NVDEC"
    elif codec in ("vp8", "vp9"):
        if (fmt.bit_depth, fmt.chroma) != (8, "420"):
            return f"{codec} {fmt.bit_depth}-bit {fmt.chroma} not decoded by NVDEC (profile 0, 8-bit 4:2:0 only)"
    elif codec == "av1":
        if fmt.chroma != "420" or fmt.bit_depth > 10:
            return f"AV1 {fmt.bit_depth}-bit {fmt.chroma} not decoded by NVDEC (Main profile: 8/10-bit 4:2:0)"
    min_w, min_h, max_w, max_h = _SIZES[codec]
    if blackwell and codec == "h264":
        max_w = max_h = 8192
    if width < min_w or height < min_h:
        return f"{width}x{height} is smaller than NVDEC's {codec} minimum {min_w}x{min_h}"
    if width > max_w or height > max_h:
        return f"{width}x{height} is larger than NVDEC's {codec} maximum {max_w}x{max_h} on {gen}"
    return None


class RoutingError(ValueError):
    """Videos this machine cannot decode with the chosen data.decode_device; the message is one line."""


_SHOWN = 3


def plan_decoding(paths: list[str], infos: list, decode_device: str, capability: tuple[int, int],
                  cpu_codecs: tuple[str, ...]) -> tuple[list[bool], str | None]:
    """Which videos DALI's CPU decoder must take because NVDEC would refuse them, for GPU decoding.

    `decode_device`: 'auto' (NVDEC where it can, the CPU decoder for refused videos of `cpu_codecs`) or 'gpu'
    (NVDEC only). Returns (decode on the CPU, per video; the start-up line to log, or None when NVDEC takes all).
    Raises RoutingError, one line: how many videos, the first few, why, and what to do.
    """
    # Kinetics has a few hundred distinct (codec, profile, format, size) among 700k videos: ask once for each
    # (the per-video calls took 5 s at 700k on the 2-core dev machine).
    asked: dict[tuple, str | None] = {}
    refusals = []
    for i in infos:
        key = (i.codec, i.profile, i.pix_fmt, i.width, i.height, i.hidden_frames)
        if key not in asked:
            asked[key] = nvdec_refusal(*key[:5], capability, hidden_frames=key[5])
        refusals.append(asked[key])
    refused = [k for k, reason in enumerate(refusals) if reason is not None]
    gen = generation(capability)
    if not refused:
        return [False] * len(infos), None

    def listing(indices):
        shown = "; ".join(f"{paths[k]}: {refusals[k]}" for k in indices[:_SHOWN])
        return shown + ("; …" if len(indices) > _SHOWN else "")

    if decode_device == "gpu":
        raise RoutingError(
            f"{len(refused)} of {len(infos)} videos cannot be decoded by NVDEC on this {gen} GPU "
            f"({listing(refused)}); use data.decode_device=auto to decode the {'/'.join(cpu_codecs)} ones on the "
            f"CPU, or re-encode them (tools/prepare_kinetics.py --reencode)")
    stuck = [k for k in refused if infos[k].codec not in cpu_codecs]
    if stuck:
        raise RoutingError(
            f"{len(stuck)} of {len(infos)} videos cannot be decoded here: NVDEC on this {gen} GPU refuses them and "
            f"DALI's CPU decoder reads only {'/'.join(cpu_codecs)} ({listing(stuck)}); re-encode them "
            f"(tools/prepare_kinetics.py --reencode) or leave them out of the list")
    on_cpu = [reason is not None for reason in refusals]
    return on_cpu, (f"{len(refused)} of {len(infos)} videos are decoded by DALI's CPU decoder, the rest by NVDEC: "
                    f"NVDEC on this {gen} GPU refuses them ({listing(refused)})")
