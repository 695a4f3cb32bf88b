"""The R(2+1)D network: sizes and keys as MMAction2 has them, layouts, gradients and checkpoint loading."""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model import CheckpointError, build_model, convert_sync_batchnorm, load_checkpoint, mid_channels

STAGES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


def mmaction2_conv_modules(depth):
    """(prefix, in, out, kernel, stride (t, s), relu) of every ConvModule, from MMAction2's module naming rules (docs/MODEL.md)."""
    rows = [("backbone.conv1", 3, 64, (3, 7, 7), (1, 2), True)]
    inplanes = 64
    for s, blocks in enumerate(STAGES[depth], start=1):
        planes = 64 * 2 ** (s - 1)
        for b in range(blocks):
            stride = 2 if (s > 1 and b == 0) else 1
            cin = inplanes if b == 0 else planes
            rows.append((f"backbone.layer{s}.{b}.conv1", cin, planes, (3, 3, 3), (stride, stride), True))
            rows.append((f"backbone.layer{s}.{b}.conv2", planes, planes, (3, 3, 3), (1, 1), False))
            if b == 0 and s > 1:
                rows.append((f"backbone.layer{s}.0.downsample", cin, planes, (1, 1, 1), (stride, stride), False))
        inplanes = planes
    return rows


def mmaction2_checkpoint(depth=34, num_classes=400, seed=0):
    """A checkpoint dict in MMAction2's published layout (`meta` + `state_dict`), random but well-formed values."""
    gen = torch.Generator().manual_seed(seed)

    def bn(prefix, channels, sd):
        sd[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(channels, generator=gen)
        sd[f"{prefix}.bias"] = 0.1 * torch.randn(channels, generator=gen)
        sd[f"{prefix}.running_mean"] = 0.1 * torch.randn(channels, generator=gen)
        sd[f"{prefix}.running_var"] = 0.5 + torch.rand(channels, generator=gen)
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(1000, dtype=torch.int64)

    sd = {}
    for prefix, cin, cout, (kt, kh, kw), _, _ in mmaction2_conv_modules(depth):
        mid = int(3 * cin * cout * kh * kw / (cin * kh * kw + 3 * cout))
        sd[f"{prefix}.conv.conv_s.weight"] = torch.randn(mid, cin, 1, kh, kw, generator=gen) * math.sqrt(2 / (cin * kh * kw))
        bn(f"{prefix}.conv.bn_s", mid, sd)
        sd[f"{prefix}.conv.conv_t.weight"] = torch.randn(cout, mid, kt, 1, 1, generator=gen) * math.sqrt(2 / (mid * kt))
        bn(f"{prefix}.bn", cout, sd)
    sd["cls_head.fc_cls.weight"] = 0.05 * torch.randn(num_classes, 512, generator=gen)
    sd["cls_head.fc_cls.bias"] = 0.05 * torch.randn(num_classes, generator=gen)
    meta = {"epoch": 180, "iter": 0, "cfg": "model = dict(type='Recognizer3D')", "seed": 0,
            "experiment_name": "r2plus1d_r34_8xb8-8x8x1-180e_kinetics400-rgb", "mmengine_version": "0.7.0"}
    return {"meta": meta, "state_dict": sd}


def reference_forward(sd, x, depth):
    """The network written straight from MMAction2's module definitions with torch.nn.functional, independent of model/."""
    def bn(prefix, x, eps):
        return F.batch_norm(x, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"],
                            sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], training=False, eps=eps)

    def conv_module(prefix, x, kernel, stride, relu):
        kt, kh, kw = kernel
        t, s = stride
        x = F.conv3d(x, sd[f"{prefix}.conv.conv_s.weight"], stride=(1, s, s), padding=(0, kh // 2, kw // 2))
        x = F.relu(bn(f"{prefix}.conv.bn_s", x, 1e-5))
        x = F.conv3d(x, sd[f"{prefix}.conv.conv_t.weight"], stride=(t, 1, 1), padding=(kt // 2, 0, 0))
        x = bn(f"{prefix}.bn", x, 1e-3)
        return F.relu(x) if relu else x

    rows = {r[0]: r for r in mmaction2_conv_modules(depth)}
    x = conv_module("backbone.conv1", x, *rows["backbone.conv1"][3:5], True)
    x = F.max_pool3d(x, (1, 3, 3), (1, 2, 2), (0, 1, 1))
    for s, blocks in enumerate(STAGES[depth], start=1):
        for b in range(blocks):
            p = f"backbone.layer{s}.{b}"
            out = conv_module(f"{p}.conv1", x, *rows[f"{p}.conv1"][3:5], True)
            out = conv_module(f"{p}.conv2", out, *rows[f"{p}.conv2"][3:5], False)
            identity = conv_module(f"{p}.downsample", x, *rows[f"{p}.downsample"][3:5], False) \
                if f"{p}.downsample" in rows else x
            x = F.relu(out + identity)
    x = F.adaptive_avg_pool3d(x, 1).flatten(1)
    return F.linear(x, sd["cls_head.fc_cls.weight"], sd["cls_head.fc_cls.bias"])


@pytest.mark.parametrize("depth, expected", [(18, 33_432_945), (34, 63_759_281)])
def test_parameter_count_matches_mmaction2(depth, expected):
    model = build_model(depth=depth, num_classes=400)
    assert sum(p.numel() for p in model.parameters()) == expected


@pytest.mark.parametrize("depth", [18, 34])
def test_state_dict_keys_and_shapes_are_mmaction2s(depth):
    ours = {k: tuple(v.shape) for k, v in build_model(depth=depth).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in mmaction2_checkpoint(depth)["state_dict"].items()}
    assert list(ours) == list(theirs)
    assert ours == theirs
    assert len(ours) == {18: 242, 34: 434}[depth]


def test_mid_width_formula_matches_the_reference_table():
    assert [mid_channels(3, 64, 7, 7), mid_channels(64, 64, 3, 3), mid_channels(64, 128, 3, 3),
            mid_channels(256, 512, 3, 3), mid_channels(512, 512, 3, 3), mid_channels(64, 128, 1, 1),
            mid_channels(128, 256, 1, 1), mid_channels(256, 512, 1, 1)] == [83, 144, 230, 921, 1152, 54, 109, 219]


@pytest.mark.parametrize("depth", [18, 34])
@pytest.mark.parametrize("t, h, w", [(8, 112, 112), (32, 64, 64), (4, 56, 80), (1, 32, 32)])
def test_output_shape(depth, t, h, w):
    model = build_model(depth=depth, num_classes=7, base_channels=8).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, t, h, w)).shape == (2, 7)


def test_feature_map_sizes_follow_the_strides():
    backbone = build_model(depth=18, base_channels=8).backbone.eval()
    with torch.no_grad():
        assert backbone(torch.randn(1, 3, 32, 224, 224)).shape == (1, 64, 4, 7, 7)
        assert backbone(torch.randn(1, 3, 8, 256, 256)).shape == (1, 64, 1, 8, 8)


def test_channels_last_output_equals_contiguous():
    torch.manual_seed(0)
    model = build_model(depth=18, num_classes=10, base_channels=16).eval()
    x = torch.randn(2, 3, 8, 64, 64)
    with torch.no_grad():
        expected = model(x)
        got = model.to(memory_format=torch.channels_last_3d)(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_every_parameter_gets_a_gradient():
    model = build_model(depth=34, num_classes=5, base_channels=8)
    F.cross_entropy(model(torch.randn(2, 3, 8, 32, 32)), torch.tensor([1, 3])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without a gradient: {no_grad}"


def test_initialisation_is_mmaction2s():
    model = build_model(depth=18, num_classes=400)
    fc = model.cls_head.fc_cls
    assert abs(fc.weight.std().item() - 0.01) < 0.001 and fc.bias.abs().sum() == 0
    w = model.backbone.layer3[1].conv1.conv.conv_s.weight  # fan_out = 576 * 1 * 3 * 3
    assert abs(w.std().item() - math.sqrt(2 / (576 * 9))) < 0.002
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm3d)]
    assert all(m.weight.eq(1).all() and m.bias.eq(0).all() for m in bns)
    assert {m.eps for m in bns} == {1e-5, 1e-3}


def test_sync_batchnorm_replaces_only_the_outer_bns():
    model = convert_sync_batchnorm(build_model(depth=18, base_channels=8))
    names = {n: type(m) for n, m in model.named_modules()}
    assert names["backbone.conv1.bn"] is nn.SyncBatchNorm and names["backbone.layer4.0.downsample.bn"] is nn.SyncBatchNorm
    assert names["backbone.conv1.conv.bn_s"] is nn.BatchNorm3d
    assert list(model.state_dict()) == list(build_model(depth=18, base_channels=8).state_dict())
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in build_model(depth=18, base_channels=8).modules())


def test_mmaction2_checkpoint_loads_and_gives_the_reference_logits(tmp_path):
    ckpt = mmaction2_checkpoint(depth=34)
    ckpt["state_dict"]["data_preprocessor.mean"] = torch.tensor([123.675, 116.28, 103.53]).view(3, 1, 1, 1)
    path = tmp_path / "r2plus1d_r34_8xb8-8x8x1-180e_kinetics400-rgb_20220812-47cfe041.pth"
    torch.save(ckpt, path)
    model = build_model(depth=34, num_classes=400)
    loaded = load_checkpoint(model, path)
    assert loaded["meta"]["epoch"] == 180
    x = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model.eval()(x)
        expected = reference_forward(ckpt["state_dict"], x, depth=34)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert got.std() > 0.01  # the logits carry signal, so the comparison means something


def test_ddp_prefixed_bare_state_dict_loads(tmp_path):
    source = build_model(depth=18, num_classes=3, base_channels=8)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "bare.pth")
    target = build_model(depth=18, num_classes=3, base_channels=8)
    load_checkpoint(target, tmp_path / "bare.pth")
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k


def test_wrong_depth_lists_the_missing_keys(tmp_path):
    torch.save(mmaction2_checkpoint(depth=18), tmp_path / "r18.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(build_model(depth=34), tmp_path / "r18.pth")
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'r18.pth'}: does not fit the model: 192 missing keys (backbone.layer1.2.conv1")
    assert "… 189 more" in message and "\n" not in message


def test_wrong_class_count_names_the_shape_mismatch(tmp_path):
    torch.save(mmaction2_checkpoint(depth=34, num_classes=400), tmp_path / "k400.pth")
    with pytest.raises(CheckpointError, match=r"k400\.pth: does not fit the model: 2 shape-mismatched keys "
                                              r"\(cls_head\.fc_cls\.weight \[400, 512\] vs model \[10, 512\]"):
        load_checkpoint(build_model(depth=34, num_classes=10), tmp_path / "k400.pth")


def test_unreadable_files_are_reported_with_their_path(tmp_path):
    model = build_model(depth=18, num_classes=3, base_channels=8)
    with pytest.raises(CheckpointError, match=r"missing\.pth: no such checkpoint file"):
        load_checkpoint(model, tmp_path / "missing.pth")
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a PyTorch checkpoint file \(neither torch\.save's"):
        load_checkpoint(model, tmp_path / "notes.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: not a checkpoint: empty file \(0 bytes\)$"):
        load_checkpoint(model, tmp_path / "empty.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match=r"list\.pth: not a checkpoint \(holds a list"):
        load_checkpoint(model, tmp_path / "list.pth")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "meta_only.pth")
    with pytest.raises(CheckpointError, match=r"meta_only\.pth: not a checkpoint \(no 'state_dict'"):
        load_checkpoint(model, tmp_path / "meta_only.pth")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "whole.pth")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth: not a readable PyTorch checkpoint"):
        load_checkpoint(model, tmp_path / "truncated.pth")


def test_pickled_code_is_refused(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"state_dict": {}, "meta": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil\.pth: not a checkpoint: it holds a Python object "
                                              r"\((builtins\.)?print\), and checkpoints are read as data only") as info:
        load_checkpoint(build_model(depth=18, base_channels=8), tmp_path / "evil.pth")
    # torch's own text advises weights_only=False, which would run the payload: that advice is not passed on
    assert "weights_only" not in str(info.value) and "\n" not in str(info.value)
    pickle_bytes = tmp_path / "set.pth"
    pickle_bytes.write_bytes(pickle.dumps({"state_dict": {}, "ids": {1, 2}}, protocol=4))
    with pytest.raises(CheckpointError, match=r"set\.pth: not a checkpoint: it holds pickled data that is not "
                                              r"tensors and plain values") as info:
        load_checkpoint(build_model(depth=18, base_channels=8), pickle_bytes)
    assert "weights_only" not in str(info.value)
