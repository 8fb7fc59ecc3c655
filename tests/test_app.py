"""`prefixvqa serve` in a real headless browser (Debian's chromium driven by playwright): upload, ask, read back the
answer and its confidence, see a bad upload rejected with a message, see a page on another local origin refused; and
the server's own limits, and its cross-site refusals request by request (in process, through the whole ASGI stack)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import io
import json
import shutil
import threading
import urllib.error
import urllib.request
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image

from prefixvqa.data.records import VQARecord

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def png_bytes(color: tuple[int, int, int]) -> bytes:
    """A small PNG of one colour: each test uploads its own colour, so the file ``keep_uploads`` would write for it
    (named by the content's sha256) is its own too."""
    png = io.BytesIO()
    Image.new("RGB", (48, 40), color).save(png, format="PNG")
    return png.getvalue()


def kept_name(data: bytes, suffix: str = ".png") -> str:
    """The name ``keep_uploads`` gives an upload (as the app does: sha256 prefix + suffix)."""
    return hashlib.sha256(data).hexdigest()[:16] + suffix


@pytest.fixture(scope="module")
def server(adapters):
    """The app on a free local port, serving two adapters on one tiny base (the second one from a hub) and keeping
    uploads in ``root / "kept"``."""
    from prefixvqa.app import create_app, start_server

    root, loaded = adapters
    app = create_app(loaded, max_upload_bytes=64 << 10, keep_uploads=root / "kept")
    srv, thread, url = start_server(app)
    yield url, root
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, tiny_decoders):
    """(root, AdapterSet): two adapters on one tiny base, the second one from a hub; a PNG and a text file in root."""
    import torch

    from prefixvqa.app import load_adapters
    from prefixvqa.config import AdapterConfig
    from prefixvqa.hub import Hub
    from prefixvqa.model import MedVQAAdapter
    from prefixvqa.testing import tiny_overrides

    root = tmp_path_factory.mktemp("app")
    over = tiny_overrides(tiny_decoders["gpt2"])
    first = MedVQAAdapter(AdapterConfig().replace(**over, name="first"))
    first.image_summary = scan_summary(first)  # trained on red scans: the striped photo below is unlike them
    first = first.save_pretrained(root / "first")
    second = MedVQAAdapter(AdapterConfig().replace(**over, name="second"))
    with torch.no_grad():
        for p in second.mapper.parameters():
            p.mul_(-1.0)
    Hub(root / "hub").push(second.save_pretrained(root / "second"), name="second")
    png = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(png, format="PNG")
    (root / "scan.png").write_bytes(png.getvalue())
    (root / "notes.txt").write_text("not an image at all\n" * 5)
    stripes = np.zeros((40, 48, 3), np.uint8)
    stripes[:, ::4] = (20, 220, 40)
    stripes[::6, :, 2] = 255
    Image.fromarray(stripes).save(root / "photo.png")
    return root, load_adapters(str(first), str(root / "hub"))


def scan_summary(model):
    """An image summary of 60 red scans (the look of ``scan.png``), its threshold on 20 more."""
    from prefixvqa.ood import fit_summary, image_features

    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(80):
        png = io.BytesIO()
        Image.new("RGB", (48, 40), tuple(int(c) for c in np.array((200, 30, 30)) + rng.integers(-25, 25, 3))).save(
            png, format="PNG")
        pngs.append(png.getvalue())
    feats = image_features(model, [VQARecord(str(i), p, "q", "a") for i, p in enumerate(pngs)])
    return fit_summary(feats[:60], feats[60:])


def post(url: str, data: bytes, question: str = "is there a lesion?", filename: str = "x.png",
         content_type: str = "application/octet-stream") -> tuple[int, dict]:
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
    assert body["ood"] is False and body["warning"] is None and body["ood_score"] <= body["ood_threshold"]
    status, body = post(url, (root / "photo.png").read_bytes())
    assert status == 200 and body["ood"] is True and body["ood_score"] > body["ood_threshold"]
    assert body["warning"] == "unlike the images this adapter was trained on"
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
            assert page.inner_text("#warning") == ""  # like the adapter's training images: no warning
            assert 0.0 < float(confidence.split("%")[0]) <= 100.0
            assert page.get_attribute("#heatmap", "src").startswith("data:image/png;base64,")
            page.screenshot(path=str(tmp_path / "app.png"))

            page.set_input_files("#file", str(root / "photo.png"))  # unlike anything the adapter trained on
            page.click("#ask")
            page.wait_for_selector("#warning:not(:empty)", timeout=60_000)
            warning = page.inner_text("#warning")
            assert warning.startswith("Warning: this image is unlike the images this adapter was trained on")
            assert page.locator("#warning").is_visible() and page.inner_text("#answer").strip()
            page.screenshot(path=str(tmp_path / "app_ood.png"))

            page.set_input_files("#file", str(root / "scan.png"))
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


# --- cross-site requests: a page on another site must not get an answer, nor get its bytes kept ------------------

APP_ORIGIN = "http://127.0.0.1:7860"  # the origin the in-process requests below are addressed to


def asgi_request(app, method: str, target: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, dict]:
    """(status, JSON body) of one request run through the whole ASGI app in process, as Starlette's TestClient does
    (which needs httpx, not installed here): Host is 127.0.0.1:7860 unless ``headers`` says otherwise."""
    path, _, query = target.partition("?")
    sent: list[dict] = []

    async def run() -> None:
        done = asyncio.Event()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive() -> dict:
            if messages:
                return messages.pop(0)
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
                 "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 7860),
                 "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in
                             {"host": "127.0.0.1:7860", **{k.lower(): v for k, v in headers.items()}}.items()]}
        await app(scope, receive, send)

    asyncio.run(run())
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body) if body.startswith(b"{") else {"text": body.decode()}


@pytest.fixture(scope="module")
def app_in_process(adapters):
    """(app, kept folder): the app keeping uploads, called in process."""
    from prefixvqa.app import create_app

    root, loaded = adapters
    return create_app(loaded, keep_uploads=root / "kept_in_process"), root / "kept_in_process"


ANSWER = "/api/answer?question=" + quote("is there a lesion?")
CROSS_SITE = {  # each one alone is refused; the first is what fetch(url, {mode: "no-cors", method: "POST", body})
    # on a page elsewhere sends
    "no-cors fetch from another site": {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
    "foreign Origin": {"Origin": "https://evil.example", "Content-Type": "image/png"},
    "another port on the same host": {"Origin": "http://127.0.0.1:9999", "Content-Type": "image/png"},
    "another scheme": {"Origin": "https://127.0.0.1:7860", "Content-Type": "image/png"},
    "null Origin (sandboxed frame, file: page)": {"Origin": "null", "Content-Type": "image/png"},
    "cross-site Sec-Fetch-Site": {"Sec-Fetch-Site": "cross-site", "Content-Type": "image/png"},
    "same-site Sec-Fetch-Site": {"Sec-Fetch-Site": "same-site", "Content-Type": "image/png"},
    "no Content-Type": {},
    "no Content-Type, own Origin": {"Origin": APP_ORIGIN, "Sec-Fetch-Site": "same-origin"},
}


@pytest.mark.parametrize("headers", CROSS_SITE.values(), ids=CROSS_SITE.keys())
def test_cross_site_posts_are_refused_and_nothing_is_kept(app_in_process, headers):
    app, kept = app_in_process
    data = png_bytes((10, 200, 10))
    status, body = asgi_request(app, "POST", ANSWER, headers, data)
    assert status == 403 and list(body) == ["error"] and "\n" not in body["error"], body
    assert "refused" in body["error"]
    assert not (kept / kept_name(data)).exists() and not (kept.exists() and any(kept.iterdir()))


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "OPTIONS"])
def test_every_state_changing_method_is_checked(app_in_process, method):
    app, _ = app_in_process
    status, body = asgi_request(app, method, ANSWER, {"Origin": "https://evil.example", "Content-Type": "image/png"})
    assert status == 403 and body["error"].startswith("Cross-site request refused: Origin 'https://evil.example'")


def test_same_origin_and_non_browser_posts_pass(app_in_process):
    app, kept = app_in_process
    page = png_bytes((10, 10, 200))  # what the app's own page sends (Chromium, see the browser test)
    status, body = asgi_request(app, "POST", ANSWER, {"Origin": APP_ORIGIN, "Sec-Fetch-Site": "same-origin",
                                                     "Content-Type": "image/png", "X-Filename": "a.png"}, page)
    assert status == 200 and body["answer"], body
    assert (kept / kept_name(page)).is_file()
    curl = png_bytes((10, 100, 200))  # a script or curl: no Origin, no Sec-Fetch-Site (or "none"), a real type
    for headers in ({"Content-Type": "application/octet-stream"},
                    {"Sec-Fetch-Site": "none", "Content-Type": "image/png"}):
        assert asgi_request(app, "POST", ANSWER, headers, curl)[0] == 200
    # reading is not checked: GET from anywhere changes nothing (and without CORS a foreign page cannot read it)
    assert asgi_request(app, "GET", "/api/adapters", {"Origin": "https://evil.example"})[0] == 200
    # a form type stays "not an image" (415), as before
    assert asgi_request(app, "POST", ANSWER, {"Content-Type": "text/plain"}, page)[0] == 415
    # the Host is checked first: a rebound name matches its own Origin, and is still refused (400) for its Host
    rebound = {"Host": "attacker.example", "Origin": "http://attacker.example", "Content-Type": "image/png"}
    assert asgi_request(app, "POST", ANSWER, rebound, page)[0] == 400


def test_own_origin_is_compared_by_scheme_host_and_port():
    from prefixvqa.app import refuse_cross_site

    def refused(origin: str, own: str) -> bool:
        return refuse_cross_site("POST", {"origin": origin, "content-type": "image/png"}, own) is not None

    assert not refused("http://localhost", "http://localhost:80")
    assert not refused("http://LOCALHOST:7860", "http://localhost:7860")
    assert not refused("http://[::1]:7860", "http://[::1]:7860")
    assert refused("http://localhost:7860", "http://127.0.0.1:7860")  # another name is another origin
    assert refused("http://127.0.0.1:7860", "http://")  # no Host: nothing is the app's origin
    assert refused("http://127.0.0.1:99999", "http://127.0.0.1:7860")  # not an origin at all
    assert refuse_cross_site("GET", {"origin": "null"}, "http://127.0.0.1:7860") is None
    assert refuse_cross_site("HEAD", {"sec-fetch-site": "cross-site"}, "http://127.0.0.1:7860") is None


FOREIGN_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>elsewhere</title></head><body><script>
(async () => {
  const url = "%(app)s/api/answer?question=is%%20there%%20a%%20lesion%%3F";
  const png = Uint8Array.from(atob("%(png)s"), (c) => c.charCodeAt(0));
  const out = {};
  try {  // no Content-Type, response opaque: the script never sees it, but the app would act on it
    const res = await fetch(url, {mode: "no-cors", method: "POST", body: new Blob([png])});
    out.nocors = res.type;
  } catch (e) { out.nocors = "failed: " + e; }
  try {  // an image type needs a CORS preflight, which the app never grants
    const res = await fetch(url, {method: "POST", body: png, headers: {"Content-Type": "image/png"}});
    out.cors = res.status;
  } catch (e) { out.cors = "failed: " + e; }
  window.outcome = out;
})();
</script></body></html>"""


@pytest.fixture
def foreign_site(server):
    """A page on a second local origin (another port on 127.0.0.1) whose script posts an image to the app."""
    url, _ = server
    page = FOREIGN_PAGE % {"app": url, "png": base64.b64encode(png_bytes((250, 250, 10))).decode()}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write(page.encode())

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    thread.join(timeout=10)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (scripts/install.sh installs it)")
def test_browser_page_on_another_origin_is_refused(server, foreign_site, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    url, root = server
    kept = root / "kept"
    before = sorted(kept.iterdir()) if kept.exists() else []
    answers = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            page.on("response", lambda r: answers.append((r.request.method, r.status))
                    if "/api/answer" in r.url else None)
            page.goto(foreign_site)
            page.wait_for_function("window.outcome !== undefined", timeout=60_000)
            outcome = page.evaluate("window.outcome")
            assert outcome["nocors"] == "opaque"  # sent: the browser does not stop it, the app must
            assert str(outcome["cors"]).startswith("failed: TypeError"), outcome  # preflight refused: never sent
            assert ("POST", 403) in answers and ("POST", 200) not in answers, answers
            assert (sorted(kept.iterdir()) if kept.exists() else []) == before  # the foreign bytes were not kept

            own = png_bytes((10, 250, 250))  # the app's own page still answers (and its upload is kept)
            (tmp_path / "own.png").write_bytes(own)
            page.goto(url)
            page.set_input_files("#file", str(tmp_path / "own.png"))
            page.fill("#question", "is there a lesion?")
            page.click("#ask")
            page.wait_for_selector("#result:not([hidden])", timeout=60_000)
            assert page.inner_text("#error") == "" and page.inner_text("#answer").strip()
            assert (kept / kept_name(own)).is_file()
        finally:
            browser.close()
