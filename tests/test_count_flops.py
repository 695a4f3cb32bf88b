"""tools/count_flops.py reproduces MMAction2's published parameter and FLOP figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config, readme_gflops, exact_macs", [
    ("k400_8x8x1.yaml", 53.1, 53_175_572_992),
    ("k400_32x2x1.yaml", 213.0, 212_701_677_568),
])
def test_published_params_and_flops(config, readme_gflops, exact_macs):
    out = subprocess.run([sys.executable, "tools/count_flops.py", "--config", config, "--json"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["params"] == 63_759_281
    assert abs(result["macs"] / 1e9 - readme_gflops) / readme_gflops < 0.005
    assert result["macs"] == exact_macs  # the metafile's exact figure before it was rounded
    assert result["view_shape"] == [3, result["train_shape"][1], 256, 256]
    assert result["train_flops_fwd_bwd"] == 6 * (result["macs_by_op"]["conv"] * (224 / 256) ** 2 + 204_800)


def test_shape_flag_and_config_errors():
    out = subprocess.run([sys.executable, "tools/count_flops.py", "--config", "k400_8x8x1.yaml", "--json",
                          "--shape", "8", "224", "224", "--set", "model.num_classes=10"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["view_shape"] == [3, 8, 224, 224]
    assert round(result["macs_by_op"]["conv"] / 1e9, 2) == 40.56  # conv MACs at 224x224, as mmcv's counter (MMAction2 get_flops.py) gives them
    assert result["params"] == 63_759_281 - 390 * 513
    bad = subprocess.run([sys.executable, "tools/count_flops.py", "--config", "k400_8x8x1.yaml",
                          "--set", "model.depht=18"], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and "unknown key 'model.depht' (did you mean 'model.depth'?)" in bad.stderr
