"""`prefixvqa serve`: a local web app to ask an adapter about an image (FastAPI + uvicorn, one self-contained page).

Upload a PNG, JPEG or DICOM image, ask a question, get the answer, its confidence (calibrated when the adapter is;
"uncertain" below the threshold) and a grounding heatmap; pick among the loaded adapters (the given one plus every
hub adapter trained on the same base models, switched per request on one loaded base, see `adapter_set`).

Offline and private by construction: the page has no external scripts, styles, fonts or images, and its
Content-Security-Policy forbids fetching any; FastAPI's interactive docs (which load assets from a CDN) are off;
neither FastAPI nor uvicorn sends telemetry. The server binds 127.0.0.1 unless told otherwise. Uploads are read
into memory up to a size cap, checked to be PNG, JPEG or DICOM, and dropped after the response (written to disk only
with ``keep_uploads``). A page on another site cannot make it act: a request other than GET/HEAD with a foreign
Origin or Sec-Fetch-Site, or without a Content-Type, is refused (``refuse_cross_site``); the app never grants CORS.

Why not Gradio: its default themes request Google Fonts and its install adds some twenty packages (and moves Pillow);
the page a VQA demo needs is small enough to own, and owning it makes "nothing leaves the machine" checkable.
"""

# no `from __future__ import annotations`: FastAPI reads the endpoint annotations (Request) at definition time,
# and Request is imported inside create_app so that fastapi stays an optional dependency
import base64
import hashlib
import html
import ipaddress
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence
from urllib.parse import unquote, urlsplit

from .errors import PrefixVQAError
from .fileio import atomic_write

if TYPE_CHECKING:
    from .adapter_set import AdapterSet

log = logging.getLogger(__name__)

__all__ = ["create_app", "serve", "start_server", "ACCEPTED", "refuse_cross_site"]

ACCEPTED = "PNG, JPEG or DICOM"
MAX_QUESTION = 500
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")

# the page's fetch sets referrerPolicy "same-origin": under the no-referrer policy the Fetch standard sends
# `Origin: null` on a same-origin POST (Chromium sends the origin anyway), which refuse_cross_site refuses
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>prefixvqa</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 52rem; color: #222; }}
 h1 {{ font-size: 1.3rem; margin-bottom: .2rem; }} .note {{ color: #666; font-size: .85rem; }}
 form > label {{ display: block; margin: .7rem 0 .2rem; font-weight: 600; }}
 input[type=text] {{ width: 100%; padding: .4rem; box-sizing: border-box; }}
 button {{ margin-top: .8rem; padding: .45rem 1.2rem; }}
 #error {{ color: #a00; margin-top: .8rem; min-height: 1.2rem; }}
 #result {{ display: flex; gap: 1.5rem; margin-top: 1rem; align-items: flex-start; }}
 #result[hidden] {{ display: none; }}
 #result img {{ width: 256px; height: 256px; object-fit: contain; background: #111; image-rendering: auto; }}
 .answer {{ font-size: 1.25rem; font-weight: 600; }} .uncertain {{ color: #b35c00; }}
 #warning {{ color: #a00; font-weight: 600; margin: .3rem 0; }} #warning:empty {{ display: none; }}
</style></head><body>
<h1>prefixvqa</h1>
<div class="note">Local research demo, not a medical device. Images are processed in memory and not kept.</div>
<form id="form" onsubmit="return false">
 <label for="adapter">Adapter</label><select id="adapter">{options}</select>
 <label for="file">Image ({accepted}, at most {max_mb:g} MB)</label>
 <input id="file" type="file" accept=".png,.jpg,.jpeg,.dcm,.dicom,image/png,image/jpeg,application/dicom">
 <label for="question">Question</label>
 <input id="question" type="text" maxlength="{max_question}" placeholder="Is there a lesion in the image?">
 <button id="ask" type="button">Ask</button>
</form>
<div id="error" role="alert"></div>
<div id="result" hidden>
 <div><div class="note">answer</div><div id="answer" class="answer"></div><div id="warning" role="status"></div>
  <div class="note">confidence</div><div id="confidence"></div><div id="guess" class="note"></div></div>
 <figure><img id="heatmap" alt="grounding heatmap"><figcaption class="note">what the answer depended on
  (<span id="method"></span>)</figcaption></figure>
</div>
<script>
const $ = (id) => document.getElementById(id);
$("ask").addEventListener("click", async () => {{
  $("error").textContent = ""; $("result").hidden = true;
  const file = $("file").files[0];
  if (!file) {{ $("error").textContent = "Choose an image first."; return; }}
  const q = $("question").value.trim();
  if (!q) {{ $("error").textContent = "Type a question."; return; }}
  $("ask").disabled = true; $("ask").textContent = "Thinking...";
  try {{
    const url = "/api/answer?question=" + encodeURIComponent(q) + "&adapter=" + encodeURIComponent($("adapter").value);
    const res = await fetch(url, {{method: "POST", body: file, referrerPolicy: "same-origin", headers: {{
      "Content-Type": file.type || "application/octet-stream", "X-Filename": encodeURIComponent(file.name)}}}});
    const data = await res.json();
    if (!res.ok) {{ $("error").textContent = data.error || ("request failed: " + res.status); return; }}
    $("answer").textContent = data.answer;
    $("answer").className = "answer" + (data.abstained ? " uncertain" : "");
    $("confidence").textContent = (100 * data.confidence).toFixed(1) + "%" + (data.calibrated ? "" : " (uncalibrated)");
    $("guess").textContent = data.abstained ? ("best guess: " + data.guess + (data.ood ? ", withheld: unfamiliar image"
      : ", below the threshold " + (100 * data.threshold).toFixed(0) + "%")) : "";
    $("warning").textContent = data.warning ? ("Warning: this image is " + data.warning + " (score "
      + data.ood_score.toFixed(2) + " > " + data.ood_threshold.toFixed(2) + ").") : "";
    $("heatmap").src = data.heatmap; $("method").textContent = data.method;
    $("result").hidden = false;
  }} catch (e) {{ $("error").textContent = "request failed: " + e; }}
  finally {{ $("ask").disabled = false; $("ask").textContent = "Ask"; }}
}});
</script></body></html>
"""


class UploadError(PrefixVQAError, ValueError):
    """An upload the app refuses; the message is shown to the user."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def check_upload(data: bytes, filename: str) -> Any:
    """Decoded image (PIL) of an uploaded PNG, JPEG or DICOM file, or UploadError saying why not."""
    from .data.images import ImageLoadError, _pil_format, detect_image_kind
    from .data.processor import MedVQAProcessor

    if not data:
        raise UploadError("The upload is empty.")
    kind = detect_image_kind(data[:1024], filename)
    if not (kind == "dicom" or (kind == "pil" and _pil_format(data[:16]) in ("PNG", "JPEG"))):
        raise UploadError(f"{filename or 'the upload'} is not a {ACCEPTED} image.", 415)
    try:
        return MedVQAProcessor.load_image(data, name=filename or None)
    except ImageLoadError as exc:
        raise UploadError(f"The image could not be read: {exc}") from None


#: content types a page on another site can POST without asking (no CORS preflight): never an image upload here
FORM_TYPES = ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data")
#: methods that change nothing; every other one is checked by ``refuse_cross_site``
SAFE_METHODS = ("GET", "HEAD")
#: ``Sec-Fetch-Site`` values of the app's own page (same-origin) and of the user's own action (none: typed, bookmark)
OWN_FETCH_SITES = ("same-origin", "none")


def _origin_key(origin: str) -> tuple[str, str, int] | None:
    """(scheme, host, port) of an origin such as ``http://127.0.0.1:7860``, the default port filled in; None for
    ``null`` or anything that is not an http(s) origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return None
    return parts.scheme.lower(), parts.hostname.lower(), port or (443 if parts.scheme.lower() == "https" else 80)


def refuse_cross_site(method: str, headers: Mapping[str, str], own_origin: str) -> str | None:
    """Why a request must be refused as one a page on another site could have sent, or None to let it in.

    GET and HEAD change nothing and pass. Any other method is refused when its ``Origin`` is present and not
    ``own_origin`` (``null`` included: sandboxed frames, ``file:`` and ``data:`` pages), when its ``Sec-Fetch-Site``
    is present and not same-origin/none, or when it has no ``Content-Type``. Current browsers send Origin on every
    cross-origin POST, and Sec-Fetch-Site on every request to https or loopback, so either check alone stops another
    site's page; the Content-Type rule is for browsers that send neither: a page can POST without a CORS preflight
    only with no Content-Type or a form type (which the answer endpoint refuses as not an image), and the app grants
    no preflight. ``headers`` must look names up case-insensitively (Starlette's do); ``own_origin`` is the scheme and
    Host the request was sent to (the Host is checked against the allowed hosts first)."""
    if method.upper() in SAFE_METHODS:
        return None
    origin = headers.get("origin")
    if origin is not None and (_origin_key(origin) or ()) != _origin_key(own_origin):
        return f"Cross-site request refused: Origin {origin[:100]!r} is not this app's origin ({own_origin[:100]})."
    site = headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in OWN_FETCH_SITES:
        return f"Cross-site request refused: Sec-Fetch-Site is {site[:40]!r}, not same-origin."
    if not headers.get("content-type", "").strip():
        return (f"{method.upper()} refused without a Content-Type: name the upload's type (image/png, image/jpeg, "
                "application/dicom or application/octet-stream).")
    return None


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _error(message: str, status: int = 400) -> Any:
    """The JSON error the page shows (``{"error": message}``)."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def create_app(adapters: "AdapterSet", *, max_upload_bytes: int = 20 << 20, abstain_below: float | None = None,
               keep_uploads: str | os.PathLike | None = None, explain_method: str = "occlusion",
               max_new_tokens: int | None = None, allowed_hosts: Sequence[str] = ()) -> Any:
    """The FastAPI app serving ``adapters``. Requests must name a loopback host (or one of ``allowed_hosts``), which
    stops DNS-rebinding pages from reaching it; a request other than GET/HEAD that another site's page could have sent
    gets 403 before its body is read (``refuse_cross_site``), and uploads must not be a type a cross-site form could
    send."""
    from fastapi import FastAPI, Request
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    app = FastAPI(title="prefixvqa", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def same_origin_only(request: Any, call_next: Any) -> Any:  # runs after the Host check below
        own = f"{request.url.scheme}://{request.headers.get('host', '')}"
        refusal = refuse_cross_site(request.method, request.headers, own)
        if refusal is not None:
            log.warning("%s %s: %s", request.method, request.url.path, refusal)
            return _error(refusal, 403)
        return await call_next(request)

    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost", "::1", *allowed_hosts])
    _add_pages(app, adapters, max_upload_bytes)
    keep = Path(keep_uploads) if keep_uploads else None

    def run(data: bytes, filename: str, question: str, name: str) -> dict[str, Any]:
        return _answer_upload(adapters, data, filename, question, name, keep=keep, abstain_below=abstain_below,
                             explain_method=explain_method, max_new_tokens=max_new_tokens)

    @app.post("/api/answer")
    async def answer(request: Request, question: str = "", adapter: str = "") -> Any:
        question = question.strip()
        if not question:
            return _error("Type a question.")
        if len(question) > MAX_QUESTION:
            return _error(f"The question is longer than {MAX_QUESTION} characters.")
        name = adapter or adapters.names[0]
        if name not in adapters.names:
            return _error(f"Unknown adapter {name!r}.", 404)
        body = await _read_upload(request, max_upload_bytes)
        if body is None:
            return _error(f"The image is larger than the {max_upload_bytes / (1 << 20):g} MB limit.", 413)
        filename = Path(unquote(request.headers.get("x-filename", ""))).name[:200]
        if request.headers.get("content-type", "").split(";")[0].strip().lower() in FORM_TYPES:
            return _error(f"{filename or 'the upload'} is not a {ACCEPTED} image.", 415)  # nor a cross-site form post
        try:
            return await run_in_threadpool(run, body, filename, question, name)
        except UploadError as exc:
            return _error(str(exc), exc.status)
        except Exception as exc:  # the page shows the message; a bare 500 would read as a broken page
            log.exception("answering failed")
            return _error(f"Answering failed: {exc.__class__.__name__}: {exc}", 500)

    return app


def _add_pages(app: Any, adapters: "AdapterSet", max_upload_bytes: int) -> None:
    """Everything but answering: the security headers on every response, the page, the adapter list, the health
    check."""
    from fastapi.responses import HTMLResponse

    @app.middleware("http")
    async def headers(request: Any, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Cache-Control"] = "no-store"
        return response

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        options = "".join(f'<option value="{html.escape(n)}"{" selected" if n == adapters.active else ""}>'
                          f"{html.escape(n)}</option>" for n in adapters.names)
        return _PAGE.format(options=options, accepted=ACCEPTED, max_mb=max_upload_bytes / (1 << 20),
                            max_question=MAX_QUESTION)

    @app.get("/api/adapters")
    def list_adapters() -> dict[str, Any]:
        return {"adapters": adapters.names, "default": adapters.names[0]}

    @app.get("/healthz")
    def health() -> dict[str, str]:
        return {"status": "ok"}


async def _read_upload(request: Any, max_upload_bytes: int) -> bytes | None:
    """The request body, or None once it is (or declares to be) larger than the limit: never read past it."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_upload_bytes:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_upload_bytes:
            return None
    return bytes(body)


def _answer_upload(adapters: "AdapterSet", data: bytes, filename: str, question: str, name: str, *,
                  keep: Path | None = None, abstain_below: float | None = None, explain_method: str = "occlusion",
                  max_new_tokens: int | None = None) -> dict[str, Any]:
    """What the page shows for one upload: the answer (or "uncertain" below the threshold: ``abstain_below``, else
    the adapter's calibrated one), its confidence, a grounding heatmap, and the warning when the image is unlike the
    adapter's training images (`prefixvqa.ood`). Raises UploadError for a bad image; the
    upload is written under ``keep`` only when given."""
    from .explain import grounding_map, overlay, png_bytes
    from .model import abstain

    image = check_upload(data, filename)
    if keep is not None:
        atomic_write(keep / (hashlib.sha256(data).hexdigest()[:16] + Path(filename).suffix.lower()), data)
    with adapters.using(name) as model:
        threshold = abstain_below if abstain_below is not None else (
            model.calibration.threshold if model.calibration is not None else None)
        g = grounding_map(model, image, question, method=explain_method, max_new_tokens=max_new_tokens)
        calibrated = model.calibration is not None
        ood_threshold = model.image_summary.threshold if model.image_summary is not None else None
    a = abstain(g.answer, threshold)
    return {"answer": a.text, "guess": a.guess or a.text, "abstained": a.abstained, "confidence": a.confidence,
            "calibrated": calibrated, "threshold": threshold, "adapter": name, "method": g.method,
            "ood_score": a.ood_score, "ood": a.ood, "warning": a.warning, "ood_threshold": ood_threshold,
            "heatmap": _data_url(png_bytes(overlay(g.image, g.heatmap)))}


def load_adapters(adapter: str, hub: str | None = None) -> "AdapterSet":
    """The given adapter plus every hub adapter trained on the same base models (skipping, with a log line, any
    that cannot join)."""
    from .adapter_io import AdapterLoadError
    from .adapter_set import AdapterSet
    from .hub import Hub, HubError, iter_compatible

    hub_ = Hub(hub)
    given = hub_.resolve(adapter) if not Path(adapter).is_dir() and adapter in hub_ else adapter
    adapters = AdapterSet.load(given, name=str(adapter))
    try:
        refs = list(iter_compatible(hub_, adapters.model.base_fingerprints))
    except HubError as exc:
        log.warning("hub %s not read: %s", hub, exc)
        refs = []
    for ref in refs:
        if ref in adapters.names or str(ref.split("@")[0]) == str(adapter):
            continue
        try:
            adapters.add(hub_.resolve(ref), name=ref)
        except (AdapterLoadError, HubError) as exc:
            log.warning("hub adapter %s not offered: %s", ref, exc)
    return adapters


def _check_host(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        log.warning("serving on %s: other machines can reach this app; it has no authentication", host)


def serve(adapter: str, *, hub: str | None = None, host: str = "127.0.0.1", port: int = 7860,
          max_upload_mb: float = 20.0, abstain_below: float | None = None, keep_uploads: str | None = None,
          explain_method: str = "occlusion") -> None:
    """Load the adapters and run the app until interrupted."""
    import uvicorn

    _check_host(host)
    app = create_app(load_adapters(adapter, hub), max_upload_bytes=int(max_upload_mb * (1 << 20)),
                     abstain_below=abstain_below, keep_uploads=keep_uploads, explain_method=explain_method,
                     allowed_hosts=[host] if host not in ("0.0.0.0", "::") else ["*"])
    print(f"prefixvqa app on http://{host}:{port}/ (Ctrl-C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def start_server(app: Any, host: str = "127.0.0.1", port: int = 0) -> tuple[Any, threading.Thread, str]:
    """Run ``app`` in a background thread (tests, screenshots); returns (server, thread, base URL). Stop it with
    ``server.should_exit = True; thread.join()``."""
    import time

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the app server did not start")
        time.sleep(0.05)
    bound = server.servers[0].sockets[0].getsockname()
    return server, thread, f"http://{bound[0]}:{bound[1]}"
