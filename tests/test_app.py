"""`prefixvqa serve` in a real headless browser (Debian's chromium driven by playwright): upload, ask, read back the
answer and its confidence, see a bad upload rejected with a message; and the server's own limits."""

from __future__ import annotations

import io
import json
import shutil
import urllib.error
import urllib.request

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_decoders):
    """The app on a free local port, serving two adapters on one tiny base (the second one from a hub)."""
    import torch

    from prefixvqa.app import create_app, load_adapters, start_server
    from prefixvqa.config import AdapterConfig
    from prefixvqa.hub import Hub
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import tiny_overrides

    root = tmp_path_factory.mktemp("app")
    over = tiny_overrides(tiny_decoders["gpt2"])
    first = MedVQAAdapter(AdapterConfig().replace(**over, name="first")).save_pretrained(root / "first")
    second = MedVQAAdapter(AdapterConfig().replace(**over, name="second"))
    with torch.no_grad():
        for p in second.mapper.parameters():
            p.mul_(-1.0)
    Hub(root / "hub").push(second.save_pretrained(root / "second"), name="second")
    png = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(png, format="PNG")
    (root / "scan.png").write_bytes(png.getvalue())
    (root / "notes.txt").write_text("not an image at all\n" * 5)
    app = create_app(load_adapters(str(first), str(root / "hub")), max_upload_bytes=64 << 10)
    srv, thread, url = start_server(app)
    yield url, root
    srv.should_exit = True
    thread.join(timeout=10)


def post(url: str, data: bytes, question: str = "is there a lesion?", filename: str = "x.png",
         content_type: str = "application/octet-stream") -> tuple[int, dict]:
    from urllib.parse import quote

    req = urllib.request.Request(f"{url}/api/answer?question={quote(question)}", data=data, method="POST",
                                 headers={"Content-Type": content_type, "X-Filename": filename})
    try:
        with urllib.request.urlopen(req, timeout=60) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_server_limits_and_rejections(server):
    url, root = server
    assert url.startswith("http://127.0.0.1:")
    status, body = post(url, (root / "scan.png").read_bytes())
    assert status == 200 and 0.0 < body["confidence"] <= 1.0 and body["heatmap"].startswith("data:image/png;base64,")
    assert post(url, (root / "notes.txt").read_bytes(), filename="notes.txt") == (
        415, {"error": "notes.txt is not a PNG, JPEG or DICOM image."})
    status, body = post(url, b"\x89PNG\r\n\x1a\n" + b"\0" * (70 << 10))
    assert status == 413 and "limit" in body["error"]
    status, body = post(url, (root / "scan.png").read_bytes(), question="  ")
    assert status == 400 and body["error"] == "Type a question."
    with urllib.request.urlopen(f"{url}/api/adapters", timeout=10) as res:
        assert json.loads(res.read())["adapters"] == [str(root / "first"), "second@1"]
    with urllib.request.urlopen(url, timeout=10) as res:
        assert "default-src 'none'" in res.headers["Content-Security-Policy"]
        assert "http" not in res.read().decode().replace("http-equiv", "")  # no external URL in the page
    for path in ("/docs", "/openapi.json"):  # FastAPI's docs load assets from a CDN: switched off
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(url + path, timeout=10)
    # a page elsewhere can send a simple cross-site POST (text/plain) or rebind its own name to 127.0.0.1: refused
    assert post(url, (root / "scan.png").read_bytes(), filename="scan.png", content_type="text/plain")[0] == 415
    rebound = urllib.request.Request(url, headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError, match="400"):
        urllib.request.urlopen(rebound, timeout=10)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/install.sh installs it)")
def test_browser_upload_ask_and_rejection(server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    url, root = server
    requests = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.on("request", lambda r: requests.append(r.url))
            page.goto(url)
            assert page.locator("#adapter option").all_inner_texts() == [str(root / "first"), "second@1"]
            page.set_input_files("#file", str(root / "scan.png"))
            page.fill("#question", "is there a lesion?")
            page.click("#ask")
            page.wait_for_selector("#result:not([hidden])", timeout=60_000)
            answer, confidence = page.inner_text("#answer"), page.inner_text("#confidence")
            assert answer.strip() and confidence.endswith("(uncalibrated)")
            assert 0.0 < float(confidence.split("%")[0]) <= 100.0
            assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
            page.screenshot(path=str(tmp_path / "app.png"))

            page.select_option("#adapter", "second@1")  # another adapter on the same base, switched per request
            page.click("#ask")
            page.wait_for_selector("#result:not([hidden])", timeout=60_000)  # hidden again while it asks
            assert page.inner_text("#error") == "" and page.inner_text("#answer").strip()

            page.set_input_files("#file", str(root / "notes.txt"))
            page.click("#ask")
            page.wait_for_selector("#error:not(:empty)", timeout=30_000)  # (the page's CSP forbids eval)
            assert page.inner_text("#error") == "notes.txt is not a PNG, JPEG or DICOM image."
            assert page.locator("#result").is_hidden()
        finally:
            browser.close()
    # the page fetched nothing from anywhere but the app itself (no CDN, fonts or telemetry)
    assert requests and all(r.startswith(url) or r.startswith("data:") for r in requests), requests
