"""The screenshot of `orestudy serve` in docs/usage/geologist.md: the ready model (models/minerals7) on a
free local port, headless Chromium (Debian's, driven by Playwright) uploading two photos of the data set
and one generated picture of nothing mineral, then the page as a PNG.

    .venv/bin/python docs/serve_screenshot.py [--output docs/figures/serve.png] [PHOTO ...]

The committed one: `docs/serve_screenshot.py ../shared/data/minerals/malachite/0071.jpg
../shared/data/minerals/chrysocolla/0049.jpg` (two test photos of the ready model's split).
"""
from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

from orestudy.config import default_data_root
from orestudy.run import novelty, ready, serving


def main() -> None:
    root = default_data_root()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("photos", nargs="*", type=Path,
                        default=[root / "biotite" / sorted(p.name for p in (root / "biotite").iterdir())[0],
                                 root / "muscovite" / sorted(p.name for p in (root / "muscovite").iterdir())[0]])
    parser.add_argument("--output", type=Path, default=Path("docs/figures/serve.png"))
    parser.add_argument("--model", default=str(ready.READY_DIR))
    args = parser.parse_args()
    import uvicorn
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp())
    thing = work / "not_a_mineral.png"
    novelty.generated_outliers(7, seed=5)[6].save(thing)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = serving.make_app(serving.Settings(args.model, str(root)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    uploads = [str(p) for p in args.photos] + [str(thing)]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#card li")
        for upload in reversed(uploads):  # the page shows the newest first: the order given, top to bottom
            page.set_input_files("#files", [upload])
            page.wait_for_function(f"[...document.querySelectorAll('.photo[data-done]')].length >= "
                                   f"{uploads[::-1].index(upload) + 1}", timeout=120_000)
        page.wait_for_timeout(500)  # the reference thumbnails
        args.output.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.output), full_page=True)
        for box in page.locator(".photo").all():
            print(box.get_attribute("data-name"), "->", box.locator(".verdict").inner_text())
        browser.close()
    server.should_exit = True


if __name__ == "__main__":
    main()
