"""difftune fetch against a scripted HTTP server on 127.0.0.1 (no internet needed)."""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from difftune import DifftuneError
from difftune import fetch as fetch_module
from difftune.fetch import (
    MANIFEST_NAME,
    MAX_RETRY_AFTER,
    add_arguments,
    expand_pattern,
    fetch,
    is_public_address,
    parse_retry_after,
    read_url_file,
    run,
)

STORED_NAME = re.compile(r"\d{5}-[0-9a-f]{12}\.(png|jpg|gif|webp|bmp|tif)")


# --- test images ---------------------------------------------------------------------------


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def image_bytes(fmt: str, color=(200, 40, 40), size=(32, 24)) -> bytes:
    return encode(Image.new("RGB", size, color), fmt)


PNG = image_bytes("PNG")
JPEG = image_bytes("JPEG", color=(20, 90, 200))
NOISY_JPEG = encode(Image.effect_noise((128, 128), 80).convert("RGB"), "JPEG")
TRUNCATED_JPEG = NOISY_JPEG[: len(NOISY_JPEG) // 2]
HTML = b"<!DOCTYPE html><html><head><title>Please log in</title></head><body></body></html>"


# --- the loopback server -------------------------------------------------------------------

Responder = Callable[[BaseHTTPRequestHandler], None]


def respond(status: int = 200, body: bytes = b"", **headers: str) -> Responder:
    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(status)
        for name, value in headers.items():
            h.send_header(name.replace("_", "-"), value)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    return handle


def redirect(location: str, status: int = 302) -> Responder:
    return respond(status, Location=location)


def endless(h: BaseHTTPRequestHandler) -> None:
    """A chunked body that never ends (until the client hangs up, or 1 GiB as a safety stop)."""
    h.send_response(200)
    h.send_header("Content-Type", "image/jpeg")
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    chunk = b"\xff\xd8\xff" + bytes(65533)
    h.close_connection = True
    try:
        for _ in range(16384):
            h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except OSError:
        return


def cut_off(body: bytes) -> Responder:
    """Announce the whole body, send half of it, then close the connection."""

    def handle(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body[: len(body) // 2])
        h.close_connection = True

    return handle


def slow(seconds: float, body: bytes) -> Responder:
    def handle(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        respond(200, body)(h)

    return handle


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        loop: Loopback = self.server.loopback
        with loop.lock:
            loop.hits[self.path] += 1
            loop.request_headers.append(dict(self.headers))
            script = loop.routes.get(self.path, [])
            if len(script) > 1:
                responder = script.pop(0)
            else:
                responder = script[0] if script else respond(404, b"not found")
        responder(self)

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """Clients hanging up mid-response is expected here (byte caps, refusals)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Loopback:
    """A ThreadingHTTPServer on 127.0.0.1 whose paths answer with scripted responses.

    ``route(path, r1, r2, ...)`` answers the first hit with r1, the next with r2, and the
    last responder for every further hit. Unknown paths are 404. ``hits`` counts requests.
    """

    def __init__(self) -> None:
        self.routes: dict[str, list[Responder]] = {}
        self.hits: Counter[str] = Counter()
        self.request_headers: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.server.loopback = self
        serve = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        serve.start()

    def route(self, path: str, *responders: Responder) -> str:
        with self.lock:
            self.routes[path] = list(responders)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    loop = Loopback()
    yield loop
    loop.close()


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """httpx honours proxy variables; loopback requests must not go to a proxy."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)


def quick_fetch(urls, out, **options):
    """fetch() with test-friendly defaults: loopback allowed, no bar, millisecond backoff."""
    settings = dict(allow_private=True, progress=False, backoff=0.01, timeout=5.0, workers=4)
    settings.update(options)
    return fetch(urls, out, **settings)


def manifest_lines(out) -> list[dict]:
    return [json.loads(line) for line in (out / MANIFEST_NAME).read_text().splitlines()]


def stored_files(out) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != MANIFEST_NAME)


def result_for(summary, url):
    (result,) = [r for r in summary.results if r.url == url]
    return result


# --- happy paths ---------------------------------------------------------------------------


def test_keeps_real_images_under_generated_names(server, tmp_path):
    out = tmp_path / "out"
    png = server.route("/a.png", respond(200, PNG, Content_Type="image/png"))
    jpg = server.route("/pics/b", respond(200, JPEG, Content_Type="text/plain"))
    summary = quick_fetch([png, jpg], out)
    assert summary.kept == 2 and summary.usable
    files = stored_files(out)
    assert len(files) == 2 and all(STORED_NAME.fullmatch(name) for name in files)
    png_result, jpg_result = summary.results
    assert png_result.file.startswith("00000-") and png_result.file.endswith(".png")
    assert jpg_result.file.startswith("00001-") and jpg_result.file.endswith(".jpg")
    assert (out / png_result.file).read_bytes() == PNG
    assert (out / jpg_result.file).read_bytes() == JPEG
    records = manifest_lines(out)
    assert {r["url"]: r["status"] for r in records} == {png: "ok", jpg: "ok"}
    assert all(r["bytes"] and len(r["sha256"]) == 64 for r in records)


def test_file_names_never_come_from_the_url(server, tmp_path):
    out = tmp_path / "deep" / "out"
    urls = [
        server.route("/..%2F..%2Fevil.png", respond(200, PNG)),
        server.route("/x/%2e%2e/%2e%2e/evil2.jpg", respond(200, JPEG)),
    ]
    summary = quick_fetch(urls, out)
    assert summary.kept == 2
    assert all(STORED_NAME.fullmatch(name) for name in stored_files(out))
    assert sorted(p.name for p in tmp_path.rglob("*")) == sorted(["deep", "out", MANIFEST_NAME, *stored_files(out)])


def test_sends_custom_headers(server, tmp_path):
    url = server.route("/a.png", respond(200, PNG))
    quick_fetch([url], tmp_path, headers={"User-Agent": "Mozilla/5.0 test", "X-Token": "abc"})
    (sent,) = server.request_headers
    assert sent["User-Agent"] == "Mozilla/5.0 test" and sent["X-Token"] == "abc"


# --- refusals and failures ------------------------------------------------------------------


def test_refuses_bad_content_with_reason(server, tmp_path):
    urls = {
        "html page": server.route("/html.jpg", respond(200, HTML, Content_Type="image/jpeg")),
        "empty": server.route("/empty.jpg", respond(200, b"", Content_Type="image/jpeg")),
        "truncated": server.route("/cut.jpg", respond(200, TRUNCATED_JPEG, Content_Type="image/jpeg")),
        "not an image": server.route("/noise.png", respond(200, bytes(range(256)) * 8)),
    }
    summary = quick_fetch(list(urls.values()), tmp_path)
    assert summary.kept == 0 and not summary.usable
    for reason, url in urls.items():
        result = result_for(summary, url)
        assert (result.status, result.reason) == ("refused", reason)
    assert summary.refused == Counter({reason: 1 for reason in urls})
    assert stored_files(tmp_path) == []  # no image, and no temporary file left behind
    assert server.hits["/html.jpg"] == 1  # content refusals are not retried


def test_404_is_final(server, tmp_path):
    url = server.url("/missing.png")
    summary = quick_fetch([url], tmp_path, retries=3)
    assert (summary.results[0].status, summary.results[0].reason) == ("failed", "HTTP 404")
    assert server.hits["/missing.png"] == 1
    assert summary.failed == Counter({"HTTP 404": 1})


def test_503_then_200_with_retry_after(server, tmp_path):
    url = server.route("/busy.png", respond(503, b"busy", Retry_After="0"), respond(200, PNG))
    summary = quick_fetch([url], tmp_path, retries=2, backoff=30.0)  # Retry-After wins over backoff
    assert summary.kept == 1
    assert server.hits["/busy.png"] == 2


def test_429_waits_for_retry_after(server, tmp_path):
    url = server.route("/slow-down.png", respond(429, b"", Retry_After="1"), respond(200, PNG))
    start = time.monotonic()
    summary = quick_fetch([url], tmp_path, retries=1, backoff=0.01)
    assert summary.kept == 1
    assert time.monotonic() - start >= 0.9
    assert server.hits["/slow-down.png"] == 2


def test_5xx_retried_until_retries_run_out(server, tmp_path):
    url = server.route("/broken.png", respond(500, b"oops"))
    summary = quick_fetch([url], tmp_path, retries=2)
    assert (summary.results[0].status, summary.results[0].reason) == ("failed", "HTTP 500")
    assert server.hits["/broken.png"] == 3


def test_connection_cut_mid_body_is_retried(server, tmp_path):
    url = server.route("/cut.png", cut_off(PNG), respond(200, PNG))
    assert quick_fetch([url], tmp_path, retries=1).kept == 1
    assert server.hits["/cut.png"] == 2
    other = server.route("/always-cut.png", cut_off(PNG))
    result = quick_fetch([other], tmp_path, retries=0).results[0]
    assert (result.status, result.reason) == ("failed", "connection error")


def test_read_timeout(server, tmp_path):
    url = server.route("/sleepy.png", slow(1.0, PNG))
    result = quick_fetch([url], tmp_path, timeout=0.2, retries=0).results[0]
    assert (result.status, result.reason) == ("failed", "timeout")


def test_endless_body_stops_at_max_bytes(server, tmp_path):
    url = server.route("/endless.jpg", endless)
    start = time.monotonic()
    result = quick_fetch([url], tmp_path, max_bytes=256 * 1024).results[0]
    assert (result.status, result.reason) == ("refused", "too large")
    assert time.monotonic() - start < 10
    assert stored_files(tmp_path) == []


def test_content_length_over_max_bytes_is_refused(server, tmp_path):
    url = server.route("/big.png", respond(200, PNG))
    result = quick_fetch([url], tmp_path, max_bytes=len(PNG) - 1).results[0]
    assert (result.status, result.reason) == ("refused", "too large")
    assert quick_fetch([url], tmp_path, max_bytes=len(PNG)).kept == 1


# --- redirects and addresses ------------------------------------------------------------------


def test_redirect_to_file_scheme_is_refused(server, tmp_path):
    url = server.route("/sneaky.png", redirect("file:///etc/passwd"))
    result = quick_fetch([url], tmp_path).results[0]
    assert (result.status, result.reason) == ("refused", "unsupported scheme")


def test_redirect_to_good_path_is_followed(server, tmp_path):
    server.route("/new.png", respond(200, PNG))
    url = server.route("/old.png", redirect("/moved", 301))
    server.route("/moved", redirect(server.url("/new.png"), 307))
    summary = quick_fetch([url], tmp_path)
    assert summary.kept == 1
    assert (tmp_path / summary.results[0].file).read_bytes() == PNG
    assert manifest_lines(tmp_path)[0]["url"] == url


def test_redirect_loop_stops(server, tmp_path):
    url = server.route("/loop", redirect("/loop"))
    result = quick_fetch([url], tmp_path).results[0]
    assert (result.status, result.reason) == ("refused", "too many redirects")
    assert server.hits["/loop"] == fetch_module.MAX_REDIRECTS + 1


def test_loopback_refused_without_allow_private(server, tmp_path):
    url = server.route("/a.png", respond(200, PNG))
    summary = quick_fetch([url], tmp_path, allow_private=False)
    assert (summary.results[0].status, summary.results[0].reason) == ("refused", "private address")
    assert server.hits["/a.png"] == 0  # refused before connecting
    assert not summary.usable
    # The refusal depends on the option, so a rerun that allows private addresses fetches it.
    assert quick_fetch([url], tmp_path, allow_private=True).kept == 1


def test_every_redirect_hop_is_rechecked(server, tmp_path, monkeypatch):
    # Pretend 127.0.0.1 is public so the first hop is allowed; the redirect to a private
    # network address must still be refused, before any connection to it.
    monkeypatch.setattr(fetch_module, "is_public_address", lambda ip: str(ip) == "127.0.0.1")
    url = server.route("/hop.png", redirect("http://10.255.255.1/internal.png"))
    result = quick_fetch([url], tmp_path, allow_private=False, timeout=1.0).results[0]
    assert (result.status, result.reason) == ("refused", "private address")
    assert "10.255.255.1" in result.detail
    assert server.hits["/hop.png"] == 1


@pytest.mark.parametrize(
    "address, public",
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata, link-local
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("240.0.0.1", False),
        ("255.255.255.255", False),
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fc00::1", False),
        ("ff02::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:93.184.216.34", True),
        ("2002:7f00:1::", False),  # 6to4 wrapping 127.0.0.1
    ],
)
def test_is_public_address(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


# --- duplicates and resuming -------------------------------------------------------------------


def test_identical_bytes_are_stored_once(server, tmp_path):
    first = server.route("/one.png", respond(200, PNG))
    second = server.route("/two.png", respond(200, PNG))
    summary = quick_fetch([first, second], tmp_path, workers=1)
    assert (summary.kept, summary.duplicates) == (1, 1)
    kept, dup = summary.results
    assert dup.status == "duplicate" and dup.file == kept.file and dup.sha256 == kept.sha256
    assert stored_files(tmp_path) == [kept.file]


def test_rerun_downloads_nothing_twice(server, tmp_path):
    urls = [
        server.route("/a.png", respond(200, PNG)),
        server.route("/b.jpg", respond(200, JPEG)),
        server.route("/same-as-a.png", respond(200, PNG)),
        server.route("/page.jpg", respond(200, HTML)),
        server.url("/gone.png"),
    ]
    first = quick_fetch(urls, tmp_path)
    assert (first.kept, first.duplicates, first.refused.total(), first.failed.total()) == (2, 1, 1, 1)
    hits = server.hits.copy()
    files = stored_files(tmp_path)

    again = quick_fetch(urls, tmp_path)
    assert again.kept == 0 and again.already_present == 2 and again.usable
    assert stored_files(tmp_path) == files
    changed = {path: server.hits[path] - hits[path] for path in server.hits if server.hits[path] != hits[path]}
    assert changed == {"/gone.png": 1}  # only the failure is tried again
    assert again.failed == Counter({"HTTP 404": 1})
    assert len(manifest_lines(tmp_path)) == len(urls) + 1


def test_rerun_retries_what_failed(server, tmp_path):
    url = server.route("/later.png", respond(503, b""))
    assert quick_fetch([url], tmp_path, retries=0).results[0].status == "failed"
    server.route("/later.png", respond(200, PNG))
    summary = quick_fetch([url], tmp_path, retries=0)
    assert summary.kept == 1
    assert [r["status"] for r in manifest_lines(tmp_path)] == ["failed", "ok"]


def test_torn_last_manifest_line_is_tolerated(server, tmp_path):
    a = server.route("/a.png", respond(200, PNG))
    b = server.route("/b.jpg", respond(200, JPEG))
    quick_fetch([a], tmp_path)
    with (tmp_path / MANIFEST_NAME).open("a") as log:
        log.write('{"url": "' + b + '", "status": "o')  # killed mid-write
    summary = quick_fetch([a, b], tmp_path)
    assert (summary.already_present, summary.kept) == (1, 1)
    assert server.hits["/a.png"] == 1
    records = manifest_lines(tmp_path)  # every line parses again
    assert [(r["url"], r["status"]) for r in records] == [(a, "ok"), (b, "ok")]


def test_stale_partial_files_are_cleaned(server, tmp_path):
    (tmp_path / ".fetch-abc123.part").write_bytes(b"half a download")
    quick_fetch([server.route("/a.png", respond(200, PNG))], tmp_path)
    assert not list(tmp_path.glob("*.part"))


def test_bad_urls_are_input_errors(tmp_path):
    for urls in ([], ["ftp://example.com/a.png"], ["example.com/a.png"], ["http://"]):
        with pytest.raises(DifftuneError):
            fetch(urls, tmp_path, progress=False)
    assert not (tmp_path / MANIFEST_NAME).exists()


# --- helpers -----------------------------------------------------------------------------------


def test_expand_pattern():
    assert expand_pattern("https://x/svema_{i}_big.jpg", "0:3") == [
        "https://x/svema_0_big.jpg",
        "https://x/svema_1_big.jpg",
        "https://x/svema_2_big.jpg",
    ]
    assert expand_pattern("https://x/{i:03d}/{i}.png", " 9 : 11 ") == ["https://x/009/9.png", "https://x/010/10.png"]


@pytest.mark.parametrize("pattern, range_str", [
    ("https://x/a.png", "0:3"),
    ("https://x/{n}.png", "0:3"),
    ("https://x/{i}.png", "3"),
    ("https://x/{i}.png", "a:b"),
    ("https://x/{i}.png", "5:5"),
    ("https://x/{i}.png", "7:2"),
    ("https://x/{i}.png", "-1:2"),
    ("https://x/{i:zz}.png", "0:2"),
])
def test_expand_pattern_rejects(pattern, range_str):
    with pytest.raises(DifftuneError):
        expand_pattern(pattern, range_str)


def test_read_url_file(tmp_path):
    path = tmp_path / "urls.txt"
    path.write_text("\ufeff# my pictures\n\nhttps://a/1.jpg\n  https://a/2.jpg#frag  \n   # indented comment\n")
    assert read_url_file(path) == ["https://a/1.jpg", "https://a/2.jpg#frag"]
    with pytest.raises(DifftuneError, match="not found"):
        read_url_file(tmp_path / "missing.txt")


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after(" 7 ") == 7.0
    assert parse_retry_after("86400") == MAX_RETRY_AFTER
    assert parse_retry_after(formatdate(now + 12, usegmt=True), now=now) == pytest.approx(12.0)
    assert parse_retry_after(formatdate(now - 100, usegmt=True), now=now) == 0.0
    assert parse_retry_after("soon") is None


# --- the command line ----------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="difftune fetch")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_pattern_and_range(server, tmp_path, capsys):
    for i in range(3):
        server.route(f"/svema_{i}_big.png", respond(200, image_bytes("PNG", color=(i, 0, 0))))
    out = tmp_path / "out"
    args = parse([
        "--pattern", server.url("/svema_{i}_big.png"), "--range", "0:3", "--out", str(out),
        "--allow-private", "--workers", "2", "--max-bytes", "1M",
    ])
    assert args.max_bytes == 1024 * 1024
    assert run(args) == 0
    assert len(stored_files(out)) == 3
    assert "3 kept" in capsys.readouterr().out
    assert run(args) == 0  # nothing left to do, still usable
    assert "3 already present" in capsys.readouterr().out


def test_cli_url_file_with_header(server, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text(f"# seed\n{server.route('/a.jpg', respond(200, JPEG))}\n\n")
    args = parse(["--urls", str(urls), "--out", str(tmp_path / "o"), "--allow-private",
                  "--header", "User-Agent: Mozilla/5.0 (X11; Linux x86_64)"])
    assert run(args) == 0
    assert server.request_headers[0]["User-Agent"] == "Mozilla/5.0 (X11; Linux x86_64)"


def test_cli_nothing_usable_exits_nonzero(server, tmp_path, capsys):
    args = parse(["--pattern", server.url("/nope_{i}.png"), "--range", "0:2",
                  "--out", str(tmp_path), "--allow-private", "--retries", "0"])
    assert run(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no usable image" in err[0] and "2 HTTP 404" in err[0]


@pytest.mark.parametrize("argv", [
    ["--urls", "{tmp}/missing.txt"],
    ["--urls", "{tmp}/empty.txt"],
    ["--urls", "{tmp}/ftp.txt"],
    ["--pattern", "https://x/a.png", "--range", "0:3"],
    ["--pattern", "https://x/{i}.png", "--range", "3:1"],
    ["--pattern", "https://x/{i}.png", "--range", "1-3"],
    ["--pattern", "https://x/{i}.png"],
    ["--range", "0:3"],
    ["--pattern", "gopher://x/{i}.png", "--range", "0:3"],
    ["--pattern", "https://x/{i}.png", "--range", "0:3", "--header", "no colon here"],
    [],
])
def test_cli_bad_input_raises(tmp_path, argv):
    (tmp_path / "empty.txt").write_text("# nothing yet\n")
    (tmp_path / "ftp.txt").write_text("ftp://example.com/a.png\n")
    args = parse([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--out", str(tmp_path / "out")])
    with pytest.raises(DifftuneError):
        run(args)
    assert not (tmp_path / "out").exists()


def test_cli_help_shows_examples(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    help_text = capsys.readouterr().out
    assert "svema_{i}_big.jpg" in help_text and "User-Agent" in help_text
