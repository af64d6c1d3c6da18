"""``difftune fetch``: download a folder of training images from a list of URLs.

The URLs come from a text file (one per line) and/or a numbered pattern. Downloads run
concurrently with timeouts, retries and a byte cap, and only real images are kept: every
body is checked by its content (magic bytes and a full decode), never by its file name or
Content-Type, so HTML error pages, empty and truncated files are refused with the reason.

Files are named by difftune (``{index:05d}-{sha256[:12]}.{ext}``, the extension from the
detected format), never from the URL, and are written to a temporary file in the output
folder that is renamed into place once complete and verified. Identical bytes from two
URLs are stored once.

Only http and https are fetched, and only from public addresses: every hop of a redirect
is re-checked, and loopback, private, link-local, multicast and other non-public addresses
are refused unless ``allow_private`` is set (to fetch from a mirror on your own network).

Every outcome is appended to ``manifest.jsonl`` in the output folder (one JSON object
per line: url, status, file, sha256, bytes, reason, error; the last line for a URL wins),
which makes a run resumable: running the same command again skips what is done and
retries what failed.
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import os
import re
import socket
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import timezone
from email.utils import parsedate_to_datetime
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from difftune import DifftuneError, __version__
from difftune.data.images import ImageProblem, check_image_bytes

if TYPE_CHECKING:
    import httpx

MANIFEST_NAME = "manifest.jsonl"
DEFAULT_WORKERS = 8
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
MAX_REDIRECTS = 5
MAX_RETRY_AFTER = 60.0
"""Longest wait, in seconds, that a server's Retry-After header can impose before a retry."""

OK, DUPLICATE, REFUSED, FAILED = "ok", "duplicate", "refused", "failed"
STATUSES = (OK, DUPLICATE, REFUSED, FAILED)

# Refusals that depend on this run's options (--allow-private, --max-bytes) rather than on
# what the server sent: a rerun tries them again, as it does failures.
_OPTION_DEPENDENT_REASONS = frozenset({"private address", "too large"})

_EXTENSIONS = {
    "jpeg": "jpg",
    "png": "png",
    "gif": "gif",
    "webp": "webp",
    "bmp": "bmp",
    "tiff": "tif",
}
_PART_PREFIX, _PART_SUFFIX = ".fetch-", ".part"
_PLACEHOLDER = re.compile(r"\{i(?::([^{}]*))?\}")
_RANGE = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")
_SIZE = re.compile(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

EXAMPLES = """\
examples:
  # numbered files: svema_0_big.jpg .. svema_99_big.jpg (--range is A:B, B excluded)
  difftune fetch --pattern 'https://www.simonstalenhag.se/4k/svema_{i}_big.jpg' \\
      --range 0:100 --out data/stalenhag

  # a list of URLs (one per line, # comments allowed), sent with a browser User-Agent
  difftune fetch --urls urls.txt --out data/mine \\
      --header 'User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0'

  {i} may carry a format spec: 'https://example.com/img_{i:03d}.png' gives img_007.png.
  Running the same command again resumes: finished URLs are skipped, failed ones retried.
"""


@dataclass
class UrlResult:
    """What happened to one URL.

    ``status`` is one of ok, duplicate (same bytes as ``file``, kept once), refused (the
    content or the address is not acceptable) or failed (network or HTTP error).
    ``reason`` is short and countable ("html page", "HTTP 404", "timeout"), ``detail``
    free text. ``file`` is relative to the output folder. ``resumed`` marks an outcome
    taken from an earlier run's manifest instead of fetched now.
    """

    url: str
    status: str
    reason: str | None = None
    detail: str | None = None
    file: str | None = None
    sha256: str | None = None
    bytes: int | None = None
    resumed: bool = False

    @property
    def error(self) -> str | None:
        if self.reason is None:
            return None
        return f"{self.reason} ({self.detail})" if self.detail else self.reason

    def to_record(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "status": self.status,
            "file": self.file,
            "sha256": self.sha256,
            "bytes": self.bytes,
            "reason": self.reason,
            "error": self.error,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> UrlResult:
        if not isinstance(record.get("url"), str) or record.get("status") not in STATUSES:
            raise ValueError("not a fetch manifest record")
        return cls(
            url=record["url"],
            status=record["status"],
            reason=record.get("reason"),
            file=record.get("file"),
            sha256=record.get("sha256"),
            bytes=record.get("bytes"),
            resumed=True,
        )

    def settled(self) -> bool:
        """True when a rerun should not fetch this URL again."""
        if self.status in (OK, DUPLICATE):
            return True
        return self.status == REFUSED and self.reason not in _OPTION_DEPENDENT_REASONS


@dataclass
class FetchSummary:
    """Outcome of :func:`fetch`: one :class:`UrlResult` per distinct URL, in input order."""

    out_dir: Path
    results: list[UrlResult]

    def _now(self, status: str) -> list[UrlResult]:
        return [r for r in self.results if r.status == status and not r.resumed]

    @property
    def kept(self) -> int:
        """Images downloaded and stored by this run."""
        return len(self._now(OK))

    @property
    def already_present(self) -> int:
        """Images stored by an earlier run and skipped now."""
        return sum(1 for r in self.results if r.status == OK and r.resumed)

    @property
    def duplicates(self) -> int:
        return len(self._now(DUPLICATE))

    @property
    def refused(self) -> Counter[str]:
        """Refusals of this run, counted by reason."""
        return Counter(r.reason or "?" for r in self._now(REFUSED))

    @property
    def failed(self) -> Counter[str]:
        """Failures of this run, counted by reason."""
        return Counter(r.reason or "?" for r in self._now(FAILED))

    @property
    def skipped(self) -> int:
        """URLs settled by an earlier run (already present, duplicate or refused)."""
        return sum(1 for r in self.results if r.resumed)

    @property
    def usable(self) -> bool:
        """Whether the output folder holds at least one image from these URLs."""
        return self.kept + self.already_present > 0

    def report(self) -> str:
        """A short human summary, several lines."""
        refused, failed = self.refused, self.failed
        parts = [f"{self.kept} kept"]
        if self.already_present:
            parts.append(f"{self.already_present} already present")
        if self.duplicates:
            parts.append(f"{self.duplicates} duplicate")
        parts.append(f"{refused.total()} refused")
        parts.append(f"{failed.total()} failed")
        lines = [f"fetch: {', '.join(parts)} -> {self.out_dir}"]
        if refused:
            lines.append(f"  refused: {_by_reason(refused)}")
        if failed:
            lines.append(f"  failed: {_by_reason(failed)}")
        if self.skipped > self.already_present:
            settled = self.skipped - self.already_present
            lines.append(f"  {settled} more settled by an earlier run, not fetched again")
        if refused["html page"] or failed["HTTP 403"]:
            lines.append(
                "  hint: sites that answer scripts with a web page often want a browser"
                " --header 'User-Agent: ...'"
            )
        if refused or failed:
            lines.append(f"  per-URL details: {self.out_dir / MANIFEST_NAME}")
        return "\n".join(lines)

    def nothing_usable_reason(self) -> str:
        """One line saying why no image is usable (meant for when ``usable`` is False)."""
        refused, failed = self.refused, self.failed
        parts = []
        if refused:
            parts.append(f"refused {_by_reason(refused)}")
        if failed:
            parts.append(f"failed {_by_reason(failed)}")
        if self.duplicates or self.skipped:
            parts.append(f"{self.duplicates + self.skipped} duplicate or refused earlier")
        return f"no usable image fetched into {self.out_dir}: " + "; ".join(parts)


def _by_reason(counts: Counter[str]) -> str:
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


# --- inputs ------------------------------------------------------------------------------


def expand_pattern(pattern: str, range_str: str) -> list[str]:
    """URLs from ``pattern`` with ``{i}`` replaced by each number of ``range_str`` ("A:B").

    A is included and B excluded, like Python's ``range``. ``{i}`` may carry a format spec,
    e.g. ``{i:03d}`` for zero-padded numbers. Raises DifftuneError on bad input.
    """
    if not _PLACEHOLDER.search(pattern):
        raise DifftuneError(f"--pattern needs an {{i}} placeholder for the number: {pattern}")
    match = _RANGE.fullmatch(range_str)
    if not match:
        raise DifftuneError(
            f"bad --range {range_str!r}: expected A:B, e.g. 0:100 (A included, B excluded)"
        )
    start, stop = int(match[1]), int(match[2])
    if stop <= start:
        raise DifftuneError(f"bad --range {range_str!r}: empty, B must be greater than A")

    def number(i: int) -> str:
        return _PLACEHOLDER.sub(lambda m: format(i, m[1] or ""), pattern)

    try:
        return [number(i) for i in range(start, stop)]
    except ValueError as exc:
        raise DifftuneError(f"bad {{i}} format in --pattern {pattern}: {exc}") from None


def read_url_file(path: str | PathLike[str]) -> list[str]:
    """URLs listed in a text file, one per line; blank lines and ``#`` comment lines ignored."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise DifftuneError(f"URL file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DifftuneError(f"cannot read URL file {path}: {exc}") from None
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delay-seconds or HTTP date), capped.

    Returns None when the header is absent or unparseable; the result lies within
    0..MAX_RETRY_AFTER. ``now`` (a Unix time) is for tests.
    """
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``ip`` is a globally reachable unicast address (IPv4 embedded in IPv6 unwrapped)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is not None:
            return is_public_address(embedded)
        if ip.is_site_local:
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


def _check_url(url: str) -> None:
    import httpx

    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise DifftuneError(f"bad URL {url!r}: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise DifftuneError(
            f"not an http(s) URL: {url!r} (only http:// and https:// can be fetched)"
        )


def _parse_headers(headers: list[str]) -> dict[str, str]:
    parsed = {}
    for header in headers:
        name, sep, value = header.partition(":")
        if not sep or not _HEADER_NAME.fullmatch(name.strip()):
            raise DifftuneError(f"bad --header {header!r}: expected 'Name: value'")
        parsed[name.strip()] = value.strip()
    return parsed


# --- downloading -------------------------------------------------------------------------


class _Final(Exception):
    """Stop trying this URL: its outcome is ``status`` for ``reason``."""

    def __init__(self, status: str, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.status, self.reason, self.detail = status, reason, detail


class _Retry(Exception):
    """A transient failure; try again after ``delay`` seconds (None: exponential backoff)."""

    def __init__(self, reason: str, detail: str | None = None, delay: float | None = None):
        super().__init__(reason)
        self.reason, self.detail, self.delay = reason, detail, delay


@dataclass
class _Body:
    """A verified image body in a temporary file of the output folder."""

    tmp: Path
    sha256: str
    size: int
    fmt: str


@dataclass
class _Downloader:
    """Fetches one URL (redirects, retries, checks) into a verified temporary file.

    Used from several threads at once: it only reads its fields, httpx.Client is
    thread-safe, and setting ``stop`` (on Ctrl-C) ends waits and transfers early.
    """

    client: httpx.Client
    out_dir: Path
    retries: int
    max_bytes: int
    allow_private: bool
    backoff: float
    stop: threading.Event = field(default_factory=threading.Event)

    def download(self, url: str) -> UrlResult | _Body:
        """The URL's final outcome, or its verified body, after up to ``retries`` retries."""
        attempt = 0
        while True:
            try:
                return self._attempt(url)
            except _Final as final:
                return UrlResult(url, final.status, reason=final.reason, detail=final.detail)
            except _Retry as retry:
                if attempt >= self.retries:
                    return UrlResult(url, FAILED, reason=retry.reason, detail=retry.detail)
                delay = retry.delay if retry.delay is not None else self.backoff * 2**attempt
                if self.stop.wait(delay):
                    return UrlResult(url, FAILED, reason="interrupted")
                attempt += 1

    def _attempt(self, url: str) -> _Body:
        import httpx

        current = httpx.URL(url)
        for _hop in range(MAX_REDIRECTS + 1):
            self._check_target(current)
            try:
                with self.client.stream("GET", current) as response:
                    if response.is_redirect:
                        current = _redirect_target(response)
                        continue
                    _check_status(response)
                    return self._receive(response)
            except httpx.TimeoutException as exc:
                raise _Retry("timeout", type(exc).__name__) from None
            except httpx.TransportError as exc:
                raise _Retry("connection error", str(exc) or type(exc).__name__) from None
            except httpx.DecodingError as exc:
                raise _Final(FAILED, "bad content encoding", str(exc)) from None
        raise _Final(REFUSED, "too many redirects", f"more than {MAX_REDIRECTS}")

    def _check_target(self, url: httpx.URL) -> None:
        """Refuse schemes other than http(s) and, unless allowed, non-public addresses."""
        if url.scheme not in ("http", "https"):
            raise _Final(REFUSED, "unsupported scheme", f"{url.scheme}: in {url}")
        if not url.host:
            raise _Final(REFUSED, "bad url", str(url))
        if self.allow_private:
            return
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(url.raw_host.decode("ascii"), port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            if exc.errno == socket.EAI_AGAIN:
                raise _Retry("dns error", f"{url.host}: {exc.strerror}") from None
            raise _Final(FAILED, "unknown host", f"{url.host}: {exc.strerror}") from None
        for *_, sockaddr in infos:
            address = ipaddress.ip_address(sockaddr[0])
            if not is_public_address(address):
                shown = url.host if url.host == str(address) else f"{url.host} is {address}"
                detail = f"{shown}; use --allow-private for a local mirror"
                raise _Final(REFUSED, "private address", detail)

    def _receive(self, response: httpx.Response) -> _Body:
        """Stream the body to a temporary file under the byte cap, then verify it is an image."""
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise _Final(REFUSED, "too large", f"Content-Length {length} > {self.max_bytes} bytes")
        fd, name = tempfile.mkstemp(prefix=_PART_PREFIX, suffix=_PART_SUFFIX, dir=self.out_dir)
        tmp = Path(name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as fp:
                for chunk in response.iter_bytes():
                    if self.stop.is_set():
                        raise _Final(FAILED, "interrupted")
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise _Final(REFUSED, "too large", f"body over {self.max_bytes} bytes")
                    digest.update(chunk)
                    fp.write(chunk)
                fp.flush()
                os.fsync(fp.fileno())
            try:
                fmt, _size = check_image_bytes(tmp.read_bytes(), name=str(response.url))
            except ImageProblem as problem:
                raise _Final(REFUSED, problem.reason, problem.detail) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return _Body(tmp, digest.hexdigest(), size, fmt)


def _redirect_target(response: httpx.Response) -> httpx.URL:
    import httpx

    location = response.headers["Location"]
    try:
        return response.url.join(location)
    except httpx.InvalidURL as exc:
        raise _Final(FAILED, "bad redirect", f"{location!r}: {exc}") from None


def _check_status(response: httpx.Response) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in (429, 503):
        delay = parse_retry_after(response.headers.get("Retry-After"))
        raise _Retry(f"HTTP {status}", response.reason_phrase, delay)
    if status >= 500:
        raise _Retry(f"HTTP {status}", response.reason_phrase)
    raise _Final(FAILED, f"HTTP {status}", response.reason_phrase)


# --- the manifest ------------------------------------------------------------------------


def _load_manifest(path: Path) -> dict[str, UrlResult]:
    """The last outcome recorded per URL in the manifest at ``path`` (empty if none).

    A process killed mid-write leaves a torn last line without its newline: it is cut off
    here so that new lines are appended cleanly (a complete record that only lacks its
    newline, e.g. after a hand edit, is kept). Lines that are not records are ignored, so
    their URLs are fetched again.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    complete, _, tail = raw.rpartition(b"\n")
    if tail:
        if _parse_record(tail) is None:
            os.truncate(path, len(raw) - len(tail))
        else:
            with path.open("ab") as fp:
                fp.write(b"\n")
            complete = raw
    last: dict[str, UrlResult] = {}
    for line in complete.splitlines():
        result = _parse_record(line)
        if result is not None:
            last[result.url] = result
    return last


def _append_record(log: TextIO, result: UrlResult) -> None:
    """Write one manifest line and make it durable before the next outcome is handled."""
    log.write(json.dumps(result.to_record(), ensure_ascii=False) + "\n")
    log.flush()
    os.fsync(log.fileno())


def _parse_record(line: bytes) -> UrlResult | None:
    try:
        return UrlResult.from_record(json.loads(line))
    except (ValueError, TypeError, AttributeError):
        return None


# --- the library entry point -------------------------------------------------------------


def fetch(
    urls: list[str],
    out_dir: str | PathLike[str],
    *,
    headers: dict[str, str] | None = None,
    workers: int = DEFAULT_WORKERS,
    timeout: float = DEFAULT_TIMEOUT,
    retries: int = DEFAULT_RETRIES,
    max_bytes: int = DEFAULT_MAX_BYTES,
    allow_private: bool = False,
    progress: bool = True,
    backoff: float = 1.0,
) -> FetchSummary:
    """Download ``urls`` into ``out_dir``, keeping only verified, distinct images.

    ``timeout`` applies to connecting and to each read; ``retries`` is how many more times
    a URL is tried after a connection error, timeout or 5xx/429 answer, waiting
    ``backoff * 2**attempt`` seconds or what the server's Retry-After asks (capped at
    MAX_RETRY_AFTER). ``max_bytes`` caps each body while it streams. ``progress`` shows a
    bar on stderr when it is a terminal. URLs settled in ``out_dir``'s manifest by an
    earlier run are not fetched again (see the module docstring).

    Raises DifftuneError for unusable input (no URLs, a non-http(s) URL, an output path
    that is not a folder); problems with single URLs are reported in the summary.
    """
    import httpx
    from tqdm import tqdm

    urls = list(dict.fromkeys(urls))
    if not urls:
        raise DifftuneError("no URLs to fetch")
    for url in urls:
        _check_url(url)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = exc.strerror or exc
        raise DifftuneError(f"cannot use {out} as the output folder: {reason}") from None
    for stale in out.glob(f"{_PART_PREFIX}*{_PART_SUFFIX}"):
        stale.unlink(missing_ok=True)  # left by a killed run

    manifest = out / MANIFEST_NAME
    earlier = _load_manifest(manifest)
    stored = {r.sha256: r.file for r in earlier.values() if r.status == OK and r.sha256 and r.file}
    results = {url: earlier[url] for url in urls if url in earlier and earlier[url].settled()}
    todo = [(index, url) for index, url in enumerate(urls) if url not in results]

    client_headers = httpx.Headers({"User-Agent": f"difftune/{__version__}"})
    client_headers.update(headers or {})
    client = httpx.Client(
        headers=client_headers,
        timeout=httpx.Timeout(timeout),
        follow_redirects=False,
        limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers),
    )
    downloader = _Downloader(client, out, retries, max_bytes, allow_private, backoff)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="difftune-fetch")
    # disable=None: the bar shows only when stderr is a terminal.
    show = None if progress else True
    bar = tqdm(total=len(todo), desc="fetch", unit="url", file=sys.stderr, disable=show)
    try:
        with client, bar, manifest.open("a", encoding="utf-8") as log:
            futures: dict[Future[UrlResult | _Body], tuple[int, str]] = {
                pool.submit(downloader.download, url): (index, url) for index, url in todo
            }
            for future in as_completed(futures):
                index, url = futures[future]
                outcome = future.result()
                if isinstance(outcome, UrlResult):
                    result = outcome
                else:
                    result = _store(outcome, index, url, out, stored)
                _append_record(log, result)
                results[url] = result
                bar.update()
    finally:
        downloader.stop.set()
        pool.shutdown(wait=False, cancel_futures=True)
    return FetchSummary(out, [results[url] for url in urls])


def _store(body: _Body, index: int, url: str, out: Path, stored: dict[str, str]) -> UrlResult:
    """Move a verified body into place, or drop it if the same bytes are already stored.

    Runs on the main thread only, so ``stored`` (sha256 -> file name) needs no lock.
    """
    first = stored.get(body.sha256)
    if first is not None:
        body.tmp.unlink()
        return UrlResult(url, DUPLICATE, file=first, sha256=body.sha256, bytes=body.size)
    name = f"{index:05d}-{body.sha256[:12]}.{_EXTENSIONS[body.fmt]}"
    os.replace(body.tmp, out / name)
    stored[body.sha256] = name
    return UrlResult(url, OK, file=name, sha256=body.sha256, bytes=body.size)


# --- the command line --------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``fetch`` options to ``parser`` (and its examples as the epilog)."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    source = parser.add_argument_group("what to fetch (--urls and/or --pattern with --range)")
    source.add_argument(
        "--urls",
        metavar="FILE",
        help="text file with one URL per line; blank lines and # comments are ignored",
    )
    source.add_argument(
        "--pattern",
        metavar="URL",
        help="URL with an {i} placeholder for a number, e.g. https://example.com/img_{i}.jpg",
    )
    source.add_argument(
        "--range",
        metavar="A:B",
        help="numbers for {i}: A included, B excluded, like Python's range (0:100 is 0..99)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        required=True,
        help="folder for the images and manifest.jsonl (created if missing)",
    )
    parser.add_argument(
        "--header",
        metavar="'NAME: VALUE'",
        action="append",
        default=[],
        help="extra HTTP header, repeatable; e.g. a browser User-Agent for sites that refuse"
        " scripts",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=DEFAULT_WORKERS,
        help="parallel downloads (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help="connect and read timeout (default: %(default)s)",
    )
    parser.add_argument(
        "--retries",
        type=_non_negative_int,
        default=DEFAULT_RETRIES,
        help="extra tries after a timeout, connection error or 5xx/429 answer, with"
        " exponential backoff (default: %(default)s)",
    )
    parser.add_argument(
        "--max-bytes",
        type=_byte_size,
        default=DEFAULT_MAX_BYTES,
        metavar="SIZE",
        help="largest file to download, e.g. 20M; bigger ones are refused (default: 50M)",
    )
    parser.add_argument(
        "--allow-private",
        action="store_true",
        help="also fetch from loopback and private-network addresses (a mirror on your own"
        " network)",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``difftune fetch``; return the exit code (0 when any image is usable).

    Raises DifftuneError for bad input.
    """
    urls: list[str] = []
    if args.urls:
        urls += read_url_file(args.urls)
        if not urls:
            raise DifftuneError(f"no URLs in {args.urls}")
    if args.pattern or args.range:
        if not (args.pattern and args.range):
            raise DifftuneError(
                "--pattern and --range go together, e.g."
                " --pattern 'https://example.com/img_{i}.jpg' --range 0:100"
            )
        urls += expand_pattern(args.pattern, args.range)
    if not urls:
        raise DifftuneError("nothing to fetch: give --urls FILE and/or --pattern URL --range A:B")
    summary = fetch(
        urls,
        args.out,
        headers=_parse_headers(args.header),
        workers=args.workers,
        timeout=args.timeout,
        retries=args.retries,
        max_bytes=args.max_bytes,
        allow_private=args.allow_private,
    )
    print(summary.report())
    if summary.usable:
        return 0
    print(f"difftune fetch: {summary.nothing_usable_reason()}", file=sys.stderr)
    return 1


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {text}")
    return value


def _byte_size(text: str) -> int:
    """Bytes from '1000000', '500K', '20M', '1G' (1024-based; a trailing B or iB is allowed)."""
    match = _SIZE.fullmatch(text)
    if not match or int(match[1]) == 0:
        raise argparse.ArgumentTypeError(f"expected a size like 20M or 1000000, got {text!r}")
    return int(match[1]) * _SIZE_UNITS[match[2].lower()]
