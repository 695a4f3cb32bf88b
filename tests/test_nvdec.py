"""NVDEC's table (what the GPU decoder takes), the start-up plan built on it, and the routing of refused videos."""

from types import SimpleNamespace

import av
import numpy as np
import pytest

from dali_pipes.nvdec import RoutingError, generation, nvdec_refusal, pixel_format, plan_decoding
from dali_pipes.probe import CPU_CODECS, probe_video
from tools.make_synthetic import encode_clip, index_frames, write_video

HOPPER, A100, ADA, BLACKWELL, TURING, PASCAL = (9, 0), (8, 0), (8, 9), (10, 0), (7, 5), (6, 1)


@pytest.fixture(scope="module")
def h264_k400_size(tmp_path_factory):
    """libx264's defaults (High profile, yuv420p, 8-bit) at a Kinetics-like 256x192."""
    return write_video(tmp_path_factory.mktemp("nvdec") / "big.mp4", index_frames(8, 192, 256), codec="h264")


@pytest.mark.parametrize("codec, profile, pix_fmt, size, capability, refused", [
    ("h264", "High", "yuv420p", (340, 256), HOPPER, None),
    ("h264", "Main", "yuvj420p", (340, 256), PASCAL, None),
    ("h264", "High 10", "yuv420p10le", (340, 256), HOPPER, "H.264 High 10 10-bit 420 not decoded on Hopper"),
    ("h264", "High 10", "yuv420p10le", (340, 256), BLACKWELL, None),
    ("h264", "High 4:2:2", "yuv422p", (340, 256), ADA, "4:2:2 from Blackwell"),
    ("h264", "High 4:4:4 Predictive", "yuv444p", (340, 256), BLACKWELL, "8-bit 444 not decoded"),
    ("h264", "High", "yuv420p", (32, 32), HOPPER, "32x32 is smaller than NVDEC's h264 minimum 48x16"),
    ("h264", "High", "yuv420p", (6000, 4000), HOPPER, "larger than NVDEC's h264 maximum 4096x4096 on Hopper"),
    ("h264", "High", "yuv420p", (6000, 4000), BLACKWELL, None),
    ("hevc", "Main", "yuv420p", (256, 144), HOPPER, None),
    ("hevc", "Main", "yuv420p", (256, 143), HOPPER, "256x143 is smaller than NVDEC's hevc minimum 144x144"),
    ("hevc", "Main 10", "yuv420p10le", (340, 256), PASCAL, None),
    ("hevc", "Rext", "yuv444p", (340, 256), PASCAL, "HEVC 4:4:4 not decoded on Pascal (from Turing)"),
    ("hevc", "Rext", "yuv444p", (340, 256), TURING, None),
    ("hevc", "Rext", "yuv422p10le", (340, 256), HOPPER, "HEVC 4:2:2 not decoded on Hopper"),
    ("vp9", "Profile 0", "yuv420p", (64, 48), HOPPER, "64x48 is smaller than NVDEC's vp9 minimum 128x128"),
    ("vp9", "Profile 0", "yuv420p", (340, 256), HOPPER, None),
    ("vp9", "Profile 2", "yuv420p10le", (340, 256), HOPPER, "vp9 10-bit 420 not decoded by NVDEC"),
    ("av1", "Main", "yuv420p", (340, 256), HOPPER, "no AV1 decoding on Hopper"),
    ("av1", "Main", "yuv420p", (340, 256), A100, "no AV1 decoding on A100 (GA100)"),
    ("av1", "Main", "yuv420p10le", (340, 256), ADA, None),
    ("av1", "Main", "yuv420p", (340, 256), (8, 6), None),
    ("mjpeg", "Baseline", "yuvj420p", (340, 256), HOPPER, "NVDEC does not decode mjpeg"),
    ("mpeg4", "Simple Profile", "yuv420p", (340, 256), HOPPER, "NVDEC does not decode mpeg4"),
    ("h264", "High", "rgb24", (340, 256), HOPPER, "pixel format rgb24 not in NVDEC's table"),
])
def test_the_table_on_hand_made_cases(codec, profile, pix_fmt, size, capability, refused):
    reason = nvdec_refusal(codec, profile, pix_fmt, *size, capability)
    if refused is None:
        assert reason is None
    else:
        assert reason is not None and refused in reason


@pytest.mark.parametrize("codec, hidden_frames, refused", [
    ("vp9", 0, None),
    ("vp9", 3, "VP9 with 3 hidden (alt-ref) frames: NVDEC's frame numbering of those is unproven"),
    ("vp9", -1, "VP9 whose hidden (alt-ref) frames are not known: probed by an older version"),
    ("h264", -1, None),  # an old cache entry of another codec: hidden frames are a VP9 matter
    ("av1", -1, "no AV1 decoding on Hopper"),
])
def test_vp9_with_hidden_frames_is_refused_until_proven(codec, hidden_frames, refused):
    reason = nvdec_refusal(codec, "", "yuv420p", 340, 256, HOPPER, hidden_frames=hidden_frames)
    assert reason == refused if refused is None else reason.startswith(refused)


def test_pixel_formats_and_generations():
    assert pixel_format("yuv420p") == (8, "420") and pixel_format("yuvj422p") == (8, "422")
    assert pixel_format("yuv420p10le") == (10, "420") and pixel_format("yuv444p12be") == (12, "444")
    assert pixel_format("") is None and pixel_format("rgb24") is None
    assert [generation(c) for c in (HOPPER, A100, ADA, BLACKWELL, (12, 0), TURING, (7, 0), PASCAL)] == [
        "Hopper", "A100 (GA100)", "Ampere GA10x/Ada", "Blackwell", "Blackwell", "Turing", "Volta", "Pascal"]


def test_the_table_on_probed_clips(videos, h264_k400_size):
    small = probe_video(videos["long_webm"])  # 64x48 VP9, as our test and demo clips
    assert nvdec_refusal(small.codec, small.profile, small.pix_fmt, small.width, small.height, HOPPER) == \
        "64x48 is smaller than NVDEC's vp9 minimum 128x128"
    big = probe_video(h264_k400_size)
    assert (big.codec, big.profile, big.pix_fmt, big.width, big.height) == ("h264", "High", "yuv420p", 256, 192)
    assert nvdec_refusal(big.codec, big.profile, big.pix_fmt, big.width, big.height, HOPPER) is None


@pytest.mark.skipif("libsvtav1" not in av.codecs_available, reason="this PyAV has no AV1 encoder (libsvtav1)")
def test_a_probed_av1_clip_is_named_av1_and_planned_by_generation(tmp_path):
    """PyAV decodes AV1 with libdav1d: the probe names the codec (av1), not the decoder, so the table applies."""
    probed = probe_video(encode_clip(tmp_path / "av1.mp4", index_frames(4, 192, 256), "libsvtav1"))
    assert probed.codec == "av1"
    assert nvdec_refusal(probed.codec, probed.profile, probed.pix_fmt, probed.width, probed.height, HOPPER) == \
        "no AV1 decoding on Hopper (NVDEC has it on Ampere GA10x, Ada and Blackwell)"
    assert nvdec_refusal(probed.codec, probed.profile, probed.pix_fmt, probed.width, probed.height, ADA) is None


def info(codec, width=340, height=256, pix_fmt="yuv420p", profile="", hidden_frames=0):
    return SimpleNamespace(codec=codec, width=width, height=height, pix_fmt=pix_fmt, profile=profile,
                           hidden_frames=hidden_frames)


def test_auto_sends_refused_cpu_codecs_to_the_cpu_and_says_so():
    paths = ["a.mp4", "small.webm", "b.webm", "c.mp4", "tiny.webm"]
    infos = [info("h264"), info("vp9", 64, 48), info("vp9"), info("h264"), info("vp9", 96, 96)]
    on_cpu, line = plan_decoding(paths, infos, "auto", HOPPER, CPU_CODECS)
    assert on_cpu == [False, True, False, False, True]
    assert line.startswith("2 of 5 videos are decoded by DALI's CPU decoder, the rest by NVDEC: NVDEC on this Hopper "
                           "GPU refuses them (small.webm: 64x48 is smaller than NVDEC's vp9 minimum 128x128; "
                           "tiny.webm: 96x96")
    assert plan_decoding(paths[:1], infos[:1], "auto", HOPPER, CPU_CODECS) == ([False], None)


def test_auto_stops_on_videos_no_decoder_here_takes():
    paths = [f"v{k}.mp4" for k in range(6)] + ["ok.mp4"]
    infos = [info("av1")] * 6 + [info("h264")]
    with pytest.raises(RoutingError) as error:
        plan_decoding(paths, infos, "auto", HOPPER, CPU_CODECS)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("6 of 7 videos cannot be decoded here: NVDEC on this Hopper GPU refuses them and "
                              "DALI's CPU decoder reads only vp8/vp9/mjpeg (v0.mp4: no AV1 decoding on Hopper")
    assert "v2.mp4" in message and "v3.mp4" not in message and "; …)" in message
    assert message.endswith("re-encode them (tools/prepare_kinetics.py --reencode) or leave them out of the list")
    assert plan_decoding(paths, infos, "auto", ADA, CPU_CODECS) == ([False] * 7, None)  # Ada decodes AV1


def test_gpu_only_refuses_any_video_nvdec_refuses():
    with pytest.raises(RoutingError, match=r"^1 of 2 videos cannot be decoded by NVDEC on this Hopper GPU \(s.webm: "
                                           r"64x48 is smaller .*use data.decode_device=auto"):
        plan_decoding(["a.mp4", "s.webm"], [info("h264"), info("vp9", 64, 48)], "gpu", HOPPER, CPU_CODECS)
    assert plan_decoding(["a.mp4"], [info("h264")], "gpu", HOPPER, CPU_CODECS) == ([False], None)


def test_real_probed_clips_are_planned(videos, h264_k400_size):
    """The demo's small VP9 clips go to the CPU decoder, Kinetics-size H.264 to NVDEC; the small H.264 test clip
    (64x48) is above H.264's 48x16 minimum."""
    names = ["long_webm", "h264"]
    paths = [str(videos[n]) for n in names] + [str(h264_k400_size)]
    infos = [probe_video(p) for p in paths]
    on_cpu, line = plan_decoding(paths, infos, "auto", HOPPER, CPU_CODECS)
    assert on_cpu == [True, False, False] and line.startswith("1 of 3 videos")


def test_auto_sends_a_probed_vp9_clip_with_hidden_frames_to_the_cpu(tmp_path):
    """A real libvpx clip with alt-ref superframes, large enough for NVDEC (160x128): auto decodes it on the CPU and
    says why, NVDEC keeps the plain VP9 clip of the same size; gpu stops at start-up."""
    from test_probe import write_alt_ref_clip

    alt_ref = write_alt_ref_clip(tmp_path / "alt_ref.webm", index_frames(60, 128, 160))
    plain = write_video(tmp_path / "plain.webm", index_frames(20, 128, 160), codec="vp9")
    paths = [str(plain), str(alt_ref)]
    infos = [probe_video(p) for p in paths]
    assert infos[0].hidden_frames == 0 and infos[1].hidden_frames > 0
    on_cpu, line = plan_decoding(paths, infos, "auto", HOPPER, CPU_CODECS)
    assert on_cpu == [False, True]
    assert line == (f"1 of 2 videos are decoded by DALI's CPU decoder, the rest by NVDEC: NVDEC on this Hopper GPU "
                    f"refuses them ({alt_ref}: VP9 with {infos[1].hidden_frames} hidden (alt-ref) frames: NVDEC's "
                    f"frame numbering of those is unproven)")
    with pytest.raises(RoutingError, match="hidden"):
        plan_decoding(paths, infos, "gpu", HOPPER, CPU_CODECS)


def run_graph(spec, mode, routed, batch_size):
    """One batch (batch 0 of epoch 0) of the real train/eval graph on the CPU, from a BatchSource over `spec`."""
    from dali_pipes.loader import BatchSource
    from dali_pipes.pipelines import DALI_DTYPES, eval_pipeline, train_pipeline

    common = dict(source=BatchSource(spec, 0, 0), decode_device="cpu", augment_on_gpu=False,
                  dtype=DALI_DTYPES["float32"], parallel=False, source_prefetch=1, routed=routed,
                  batch_size=batch_size, num_threads=1, device_id=None, prefetch_queue_depth=1, seed=0)
    if mode == "train":
        pipe = train_pipeline(crop_size=spec.crop_size, **common)
    else:
        pipe = eval_pipeline(num_crops=spec.num_crops, **common)
    pipe.build()
    clips, labels, video_idx = pipe.run()
    return [np.array(clips[k]) for k in range(batch_size)], np.array(video_idx.as_tensor()).reshape(-1)


@pytest.mark.parametrize("mode", ["train", "test"])
@pytest.mark.parametrize("route", [(True, False, True, False), (True,) * 4, (False,) * 4])
def test_routed_samples_are_decoded_in_their_branch_and_merged_in_order(videos, tmp_path, mode, route):
    """Both branches of the routing conditional run (on the CPU here both decode with DALI's CPU decoder) and
    merge back in sample order: the batch equals the unrouted graph's, for mixed and one-sided batches."""
    import dataclasses

    from dali_pipes.loader import BatchSource, VideoLoader
    from test_loader import data_config, write_list

    names = ["long_webm", "short", "portrait", "default_gop"]
    list_file = write_list(tmp_path, [(videos[n], k) for k, n in enumerate(names)])
    loader = VideoLoader(data_config(list_file), mode, batch_size=4, num_classes=4, views=(2, 1))
    assert loader.spec.decode_on_cpu is None  # the CPU loader routes nothing
    routed_spec = dataclasses.replace(loader.spec, decode_on_cpu=np.packbits(route).tobytes())
    source = BatchSource(routed_spec, 0, 0)
    flags = [bool(source.sample(k, 0)[-1]) for k in range(4)]
    assert flags == list(route)  # the source's last column is the video's flag
    plain, plain_idx = run_graph(loader.spec, mode, False, 4)
    routed, routed_idx = run_graph(routed_spec, mode, True, 4)
    assert routed_idx.tolist() == plain_idx.tolist()
    assert len(set(plain_idx.tolist())) == 4  # four different videos: a swap in the merge would show
    for got, expected in zip(routed, plain):
        assert np.array_equal(got, expected)


@pytest.mark.gpu
def test_on_a_gpu_auto_decodes_small_vp9_on_the_cpu_and_gpu_refuses_it(videos, h264_k400_size, tmp_path, caplog):
    """64x48 VP9 is below NVDEC's minimum: auto routes it to the CPU decoder (and says so), NVDEC takes the
    256x192 H.264; data.decode_device=gpu stops at start-up with one line."""
    import logging

    from dali_pipes.loader import LoaderError, VideoLoader, decode_on_cpu
    from test_loader import data_config, frame_indices, write_list

    list_file = write_list(tmp_path, [(videos["long_webm"], 0), (h264_k400_size, 1)])
    with caplog.at_level(logging.INFO, logger="dali_pipes.loader"):
        loader = VideoLoader(data_config(list_file, decode_device="auto", clip_len=4, frame_interval=1), "val",
                             batch_size=2, num_classes=2, device_id=0)
    assert decode_on_cpu(loader.spec).tolist() == [True, False]
    assert "1 of 2 videos are decoded by DALI's CPU decoder" in caplog.text
    batch = next(iter(loader))
    assert batch.clips.is_cuda and batch.clips.shape[0] == 2
    assert frame_indices(batch.clips.cpu()).shape == (2, 4)
    with pytest.raises(LoaderError, match=r"1 of 2 videos cannot be decoded by NVDEC on this .* GPU \(.*long\.webm: "
                                          r"64x48 is smaller than NVDEC's vp9 minimum 128x128\)"):
        VideoLoader(data_config(list_file, decode_device="gpu"), "val", batch_size=2, num_classes=2, device_id=0)


@pytest.mark.gpu
def test_on_a_gpu_auto_decodes_vp9_with_hidden_frames_on_the_cpu(tmp_path, caplog):
    """A 256x192 libvpx clip with alt-ref superframes, which NVDEC's size rule takes: auto still sends it to DALI's
    CPU decoder (its NVDEC numbering is unproven), says so, and the frames are the sampled ones."""
    import logging

    from dali_pipes.loader import VideoLoader, decode_on_cpu
    from dali_pipes.sampling import sample_frames
    from test_loader import data_config, frame_indices, write_list
    from test_probe import write_alt_ref_clip

    clip = write_alt_ref_clip(tmp_path / "alt_ref.webm", index_frames(60, 192, 256))
    assert probe_video(clip).hidden_frames > 0
    list_file = write_list(tmp_path, [(clip, 0)])
    with caplog.at_level(logging.INFO, logger="dali_pipes.loader"):
        loader = VideoLoader(data_config(list_file, decode_device="auto", clip_len=4, frame_interval=4,
                                         short_side=192, val_crop=192, test_crop=192), "val", batch_size=1,
                             num_classes=1, device_id=0)
    assert decode_on_cpu(loader.spec).tolist() == [True]
    assert "hidden (alt-ref) frames: NVDEC's frame numbering of those is unproven" in caplog.text
    (batch,) = list(loader)
    assert batch.clips.is_cuda
    assert frame_indices(batch.clips.cpu()).tolist() == [sample_frames(60, 4, 4, 1, test_mode=True)[0].tolist()]
