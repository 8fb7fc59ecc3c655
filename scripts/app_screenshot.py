"""Screenshot of `prefixvqa serve` after one question (the README's picture): the app runs in-process on a free local
port, Debian's chromium (through playwright) uploads an image, asks, waits for the answer and saves the page.

    python scripts/app_screenshot.py --adapter checkpoints/demo/adapter --image scan.png \
        --question "Is there a lesion in the image?" --out docs/app.png
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--hub", default=None)
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--out", default="docs/app.png")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        print("needs Debian's chromium (scripts/install.sh installs it)", file=sys.stderr)
        return 2
    from playwright.sync_api import sync_playwright

    from prefixvqa.app import create_app, load_adapters, start_server

    server, thread, url = start_server(create_app(load_adapters(args.adapter, args.hub)))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 860, "height": 600})
            page.goto(url)
            page.set_input_files("#file", args.image)
            page.fill("#question", args.question)
            page.click("#ask")
            page.wait_for_selector("#result:not([hidden])", timeout=120_000)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            print(f"{args.out}: answer {page.inner_text('#answer')!r}, confidence {page.inner_text('#confidence')}")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
