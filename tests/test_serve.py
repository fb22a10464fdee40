"""`orestudy serve` (run/serving.py): the page's API on a live local server (answers, limits, types, the
reference thumbnails), and the page itself in a real headless Chromium (Playwright, the system's
Chromium: no browser download), uploading photos and reading the answers from the page."""
from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orestudy import config
from orestudy.commands import serve as serve_command
from orestudy.run import novelty, serving, training
from conftest import png_folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny model (frozen backbone, one epoch on generated photos) served on 127.0.0.1: (url, folder)."""
    import uvicorn

    root = tmp_path_factory.mktemp("serve")
    folder = png_folder(root / "minerals", per_class=40)  # about 24 validate: a finite novelty threshold
    run_config = config.TrainConfig(data=str(folder), output=str(root / "runs"), cache="", regime="tl",
                                    attention="none", epochs=1, freeze_epochs=1, lr=1e-2, image_size=64, batch_size=16,
                                    threads=2, progress=False, mlflow=False, precision="fp32")
    run_dir = training.run_experiment(run_config)["run_dir"]
    app = serving.make_app(serving.Settings(run_dir, str(folder), max_upload_mb=0.05, threads=2))
    port = free_port()
    instance = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=instance.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not instance.started and time.time() < deadline:
        time.sleep(0.05)
    assert instance.started
    yield f"http://127.0.0.1:{port}", folder
    instance.should_exit = True
    thread.join(10)


def post(url: str, body: bytes, content_type: str, name: str = "photo.png") -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/api/predict?name={name}", data=body, method="POST",
                                     headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.slow
def test_the_api_answers_a_photo_with_everything_the_page_shows(server):
    url, folder = server
    photo = next((folder / "malachite").iterdir())
    status, out = post(url, photo.read_bytes(), "image/png")
    assert status == 200, out
    assert out["answer"] in ("azurite", "malachite", "pyrite", "unknown", novelty.NOVEL) and out["verdict"]
    assert len(out["top"]) == 3 and out["set"] and out["set"][0] == out["top"][0][0]
    assert out["heatmap"].startswith("data:image/png;base64,") and len(out["similar"]) == 3
    near = out["similar"][0]
    assert near["label"] == "malachite" and near["distance"] >= 0
    with urllib.request.urlopen(f"{url}/api/reference/{near['index']}", timeout=30) as response:
        assert response.headers["content-type"] == "image/jpeg" and response.read(3) == b"\xff\xd8\xff"
    card = json.loads(urllib.request.urlopen(f"{url}/api/card", timeout=30).read())
    assert card["classes"] == ["azurite", "malachite", "pyrite"] and card["rules"]
    page = urllib.request.urlopen(url, timeout=30).read().decode()
    assert "<input id=\"files\" type=\"file\" multiple" in page and "at most 0.05 MB" in page


@pytest.mark.slow
def test_uploads_too_large_of_the_wrong_type_or_not_images_are_refused(server, tmp_path):
    url, _ = server
    big = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 300, 3), dtype=np.uint8)).save(big)
    status, out = post(url, big.read_bytes(), "image/png")
    assert status == 413 and "at most" in out["error"]
    status, out = post(url, b"%PDF-1.4 not a photo", "application/pdf")
    assert status == 415 and "not an image type" in out["error"]
    status, out = post(url, b"GIF89a but broken", "image/gif")
    assert status == 415 and "not a readable image" in out["error"]
    ico = tmp_path / "x.ico"
    Image.new("RGB", (16, 16)).save(ico)
    status, out = post(url, ico.read_bytes(), "application/octet-stream")
    assert status == 415 and "ICO images are not taken" in out["error"]
    for index in (-1, 10_000):
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(f"{url}/api/reference/{index}", timeout=30)


def test_serve_listens_on_localhost_by_default_and_checks_its_options(capsys):
    defaults = {a.dest: a.default for a in serve_command.argument_parser()._actions}
    assert defaults["host"] == "127.0.0.1" and defaults["max_upload_mb"] == 10.0
    with pytest.raises(SystemExit):
        serve_command.main(["--coverage", "1.5"])
    assert "--coverage must be in (0, 1)" in capsys.readouterr().err


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.mark.slow
def test_the_page_answers_uploaded_photos_in_a_browser(server, tmp_path):
    """Headless Chromium opens the page, uploads a photo of a known class and a generated picture of
    nothing mineral, and reads each answer from the page."""
    executable = chromium()
    if executable is None:
        pytest.skip("no Chromium found (apt-get install chromium; .ci/run installs it)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    url, folder = server
    photo = next((folder / "pyrite").iterdir())
    thing = tmp_path / "checkerboard.png"
    novelty.generated_outliers(5, seed=2)[4].resize((40, 40)).save(thing)  # small: under the 0.05 MB limit
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto(url)
            page.wait_for_selector("#card li", timeout=30_000)
            page.set_input_files("#files", [str(photo), str(thing)])
            page.wait_for_function("document.querySelectorAll('.photo[data-done]').length == 2", timeout=60_000)
            boxes = {box.get_attribute("data-name"): box for box in page.locator(".photo").all()}
            known, other = boxes[photo.name], boxes[thing.name]
            assert known.locator(".verdict").get_attribute("data-answer") in ("pyrite", "unknown")
            assert "pyrite" in known.locator(".set").inner_text()
            assert known.locator(".similar figure").count() == 3
            assert known.locator(".heat img").get_attribute("src").startswith("data:image/png")
            assert other.get_attribute("data-done") == "novel"
            assert other.locator(".verdict").inner_text().startswith("Not one of the 3 minerals")
            page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "serve.png").stat().st_size > 10_000
