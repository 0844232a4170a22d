"""A lean HTTP/1.1 client for one origin: the broker's calls to home.

Every request a domain makes costs one call to home, and aiohttp's client spent about 100 us of
CPU on each (its request and response objects, cookie jar, URL building, stream readers and
timers): a third of a one-user read (issue 15). This client does only what a call to home needs:
one write of the request, a parse of the answer's head, its body framed by ``Content-Length``,
``chunked`` coding or the connection's end (RFC 9112 section 6.3), and keep-alive connections
reused from a small pool. The domain-facing server stays aiohttp's (hostile input meets its
hardened parser there); home is the operator's own service, and what it answers is still checked
here: a malformed head, a body cut short or longer than ``limit``, a coding the broker cannot read
are :class:`WireError` (or :class:`~broker.http.AnswerTooLarge`), never a guess.

Redirects are answers, never followed (DESIGN section 8), as with :func:`broker.http.exchange`.
A request that finds its reused connection closed before any byte of an answer came is sent
once more on a new connection when its method is idempotent (RFC 9110 section 9.2.2), as
aiohttp does; any other failure (an answer begun, even only a 1xx, then cut) is the caller's.

Where RFC 9112 leaves a choice, the safe one is made (each has a test in tests/test_origin.py):

- A head's lines end in CRLF only: a bare CR or LF, a NUL, obs-fold or a malformed field line
  anywhere in it is a WireError, never a second way to split it. A head with LF endings is
  never complete: it ends at the timeout (TimeoutError), at MAX_HEAD or at the connection's end
  (WireError). At most MAX_INTERIM interim (1xx) answers are skipped; trailer fields are read
  (up to MAX_HEAD bytes) and dropped.
- Content-Length: ASCII digits only (at most 18), equal if repeated. Transfer-Encoding wins
  over it (section 6.3), and the connection is then not reused; Transfer-Encoding in an HTTP/1.0
  answer is a WireError (section 6.1). Transfer codings before ``chunked``, or without it (the
  body then ends with the connection), may only be gzip or deflate, and are undone.
- Only an orderly close (FIN) ends a body framed by the connection: a reset is a WireError.
- A content coding (gzip, deflate; several are undone in turn) must be exactly one whole
  stream: cut short, followed by other bytes or by a second gzip member, it is a WireError.
- Bytes after an answer (after a 204, a 304, a HEAD's, or beyond Content-Length) are garbage:
  the connection is closed, never read for the next answer. A cancelled or timed-out request
  closes its connection too.
- The request: the method and header names must be tokens, and the caller may not set Host,
  Content-Length, Transfer-Encoding or Connection; a CR, LF or NUL in a value is refused
  (ValueError, before any byte is sent). The path is quoted as aiohttp quoted it, except that
  ``?``, ``#``, CR, LF and TAB in it are percent-encoded (never read as a query, a fragment, or
  dropped), and a dot segment (``.``, ``..``, ``%2e``) is refused: it would leave home's base.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import zlib
from collections import deque
from collections.abc import Mapping
from typing import Final

import yarl
from multidict import CIMultiDict

from broker.http import Answer, AnswerTooLarge

__all__ = ["Origin", "WireError"]

MAX_HEAD: Final = 65536
"""The longest answer head (status line and headers) read."""
KEEP_IDLE: Final = 15.0
"""Seconds an idle connection is kept for the next request (aiohttp's default)."""
MAX_INTERIM: Final = 16
"""The most interim (1xx) answers skipped before the answer."""
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
_STATUS = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9][0-9])(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FRAMING: Final = frozenset({"host", "content-length", "transfer-encoding", "connection"})
"""Request fields this client writes (or must not send): never the caller's."""
_SENDABLE: set[str] = set()
"""Header names (and methods) found to be tokens, and not framing: checked once each."""
_FIELD_BREAK = re.compile(r"[\x00\r\n]")
_DOT_SEGMENT = re.compile(r"(?:^|/)(?:\.|%2[eE]){1,2}(?=/|$)")
_PATH_ESCAPES: Final = str.maketrans(
    {"?": "%3F", "#": "%23", "\r": "%0D", "\n": "%0A", "\t": "%09"}
)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_INFLATE: Final = {"gzip": 47, "x-gzip": 47, "deflate": 15}
"""The codings read (zlib's window bits for each); any other is a WireError."""
_USER_AGENT: Final = "scim-id-broker"


class WireError(ConnectionError):
    """No complete, well-formed answer came from the origin."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: the bytes it received, and whether it has ended."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tls: bool = False) -> None:
        self.loop = loop
        self.tls = tls
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ended = False
        """The peer ended its side (or the connection was lost): no more bytes will come."""
        self.broken = False
        """It ended in an error (a reset), not in order: what came before may be cut short."""
        self.cap = MAX_HEAD
        """Reading pauses while the buffer holds more than this and the reader has not asked
        for more: a fast sender fills no more memory than the answer's bound."""
        self.idle_since = 0.0
        self.answered = False
        """Some byte came since the request was written (then it is never sent again)."""
        self.expired = False
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.answered = True
        if len(self.buffer) > self.cap and self.transport is not None and not self._paused:
            self._paused = True  # until the reader has taken what it holds (:meth:`more`)
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.ended = True
        if self.tls:
            # RFC 9112 section 9.8: over TLS only close_notify ends the stream in order; a TCP
            # end without it (anyone on the path can send one) is an incomplete close. asyncio
            # calls this for both: for close_notify while TLS is still up ("WRAPPED", or
            # "FLUSHING" when the TCP end came first while reading was paused), for a bare TCP
            # end only at its "SHUTDOWN". Where that cannot be read, the end is taken as broken.
            protocol = getattr(self.transport, "_ssl_protocol", None)
            state = getattr(getattr(protocol, "_state", None), "name", None)
            self.broken = state not in ("WRAPPED", "FLUSHING")
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self.broken = self.broken or exc is not None
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self) -> None:
        """Until more bytes come or the connection ends; WireError if it has ended."""
        if self.ended:
            raise WireError("the connection closed before the answer was complete")
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        self._waiter = self.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def idle(self) -> None:
        """Between answers: reading on (its end, or stray bytes, make it unusable)."""
        self.idle_since = self.loop.time()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def usable(self, now: float) -> bool:
        return (
            not self.ended
            and not self.buffer
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < KEEP_IDLE
        )

    def close(self) -> None:
        self.ended = True
        if self.transport is not None:
            self.transport.close()

    def expire(self) -> None:
        """The request's time is up: the connection ends (its reader gets a WireError, which
        :meth:`Origin.exchange` tells as the TimeoutError it is)."""
        self.expired = True
        self.broken = True  # what came is not an answer's end, even one the close delimits
        self.close()
        self._wake()


class Origin:
    """Keep-alive HTTP/1.1 connections to one ``http``/``https`` origin, at most ``connections``
    at once (further requests wait for one), each request bounded by ``timeout`` seconds."""

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float,
        connections: int = 100,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = yarl.URL(base_url)
        if url.scheme not in ("http", "https") or not url.raw_host:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._host = url.raw_host
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._tls: ssl.SSLContext | None = None
        if url.scheme == "https":
            self._tls = ssl_context or ssl.create_default_context()
        host = f"[{self._host}]" if ":" in self._host else self._host
        authority = host if url.is_default_port() else f"{host}:{self._port}"
        self._fixed = f"Host: {authority}\r\nUser-Agent: {_USER_AGENT}\r\n"
        self._most = connections
        self._busy = 0
        """Requests holding a slot (a connection of their own, or the right to open one)."""
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._idle: list[_Connection] = []
        self._closed = False

    async def close(self) -> None:
        self._closed = True
        for connection in self._idle:
            connection.close()
        self._idle.clear()

    async def exchange(
        self,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None = None,
        data: bytes | None = None,
        limit: int,
    ) -> Answer:
        """``method`` of ``base_url + path`` (with ``params`` as its query) and its answer, the
        body read whole; WireError, OSError or TimeoutError when there is none, AnswerTooLarge
        when its body is longer than ``limit`` bytes."""
        head = self._head(method, path, headers, params, data)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        if self._busy < self._most and not self._waiting:
            connection = self._reused()
            if connection is not None:
                # The common case, a free slot and an idle connection: bounded by a timer that
                # ends the connection, not by asyncio.timeout (about 5 us a call, issue 15).
                self._busy += 1
                timer = loop.call_at(deadline, connection.expire)
                try:
                    return await self._send(connection, method, head, data, limit)
                except WireError:
                    if connection.expired:
                        raise TimeoutError(f"home did not answer within {self.timeout} s") from None
                    if not _may_send_again(connection, method):
                        raise
                finally:
                    timer.cancel()
                    self._release()
        async with asyncio.timeout_at(deadline):
            await self._acquire()
            try:
                connection = self._reused()
                if connection is not None:
                    try:
                        return await self._send(connection, method, head, data, limit)
                    except WireError:
                        if not _may_send_again(connection, method):
                            raise
                return await self._send(await self._connect(), method, head, data, limit)
            finally:
                self._release()

    async def _acquire(self) -> None:
        """A slot (one of ``connections``): at once if one is free, else the first freed."""
        if self._busy < self._most and not self._waiting:
            self._busy += 1
            return
        handed = asyncio.get_running_loop().create_future()
        self._waiting.append(handed)
        try:
            await handed
        except asyncio.CancelledError:
            if handed.done() and not handed.cancelled():
                self._release()  # handed over as the wait was cancelled: passed on
            raise

    def _release(self) -> None:
        """A slot freed: handed to the first request waiting, if any."""
        while self._waiting:
            handed = self._waiting.popleft()
            if not handed.done():
                handed.set_result(None)
                return
        self._busy -= 1

    def _head(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        params: Mapping[str, str] | None,
        data: bytes | None,
    ) -> bytes:
        if method not in _SENDABLE:
            _check_token(method, "an HTTP method")
        if not path.isprintable() or "?" in path or "#" in path or "/." in path or "/%2" in path:
            path = _plain_path(path)
        url = yarl.URL(self.base_url + path)  # quoted as aiohttp quoted it
        if params:
            url = url.extend_query(params)
        lines = [f"{method} {url.raw_path_qs} HTTP/1.1\r\n{self._fixed}"]
        for name, value in headers.items():
            if name not in _SENDABLE:
                _check_token(name, "a header name the caller may send")
            if not value.isprintable() and _FIELD_BREAK.search(value):
                raise ValueError(f"the header {name!r} holds a line break or NUL")
            lines.append(f"{name}: {value}\r\n")
        if data is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(data or b'')}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def _reused(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable(now):
                return connection
            connection.close()
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(
            lambda: _Connection(loop, self._tls is not None),
            self._host,
            self._port,
            ssl=self._tls,
            server_hostname=self._host if self._tls else None,
        )
        return connection

    async def _send(
        self, connection: _Connection, method: str, head: bytes, data: bytes | None, limit: int
    ) -> Answer:
        done = False
        try:
            assert connection.transport is not None
            connection.answered = False
            connection.transport.write(head + data if data else head)
            answer, reusable = await _read_answer(connection, method, limit)
            done = reusable
            return answer
        finally:
            if done and not self._closed:
                connection.idle()
                self._idle.append(connection)
            else:
                connection.close()


def _may_send_again(connection: _Connection, method: str) -> bool:
    """Whether a request whose reused connection failed may go again on a new one: closed by
    home while idle, nothing of an answer came, and sending it twice does what sending it once
    does (RFC 9110 section 9.2.2)."""
    return not connection.answered and method in _IDEMPOTENT


def _check_token(text: str, what: str) -> None:
    """ValueError unless ``text`` is a token (RFC 9110 section 5.6.2) and not a framing field;
    then it is remembered (a few names and methods, from the broker's own code)."""
    if _NAME.fullmatch(text) is None or text.lower() in _FRAMING:
        raise ValueError(f"not {what}: {text!r}")
    if len(_SENDABLE) < 256:
        _SENDABLE.add(text)


def _plain_path(path: str) -> str:
    """``path`` with what yarl would read as other than path characters percent-encoded (a
    query, a fragment; CR, LF and TAB it drops); ValueError if it holds a dot segment (which
    yarl resolves: the request would leave home's base path, or name another resource)."""
    if _DOT_SEGMENT.search(path) is not None:
        raise ValueError(f"the path holds a dot segment: {path!r}")
    return path.translate(_PATH_ESCAPES)


async def _read_answer(connection: _Connection, method: str, limit: int) -> tuple[Answer, bool]:
    """The answer on ``connection``, and whether the connection may carry another request."""
    connection.cap = MAX_HEAD
    for _ in range(MAX_INTERIM + 1):
        version, status, headers = await _read_head(connection)
        if not 100 <= status < 200 or status == 101:
            break  # an interim answer (100 Continue, 103 Early Hints) is skipped
    else:
        raise WireError(f"home answered more than {MAX_INTERIM} interim (1xx) answers")
    fields = CIMultiDict(headers)
    tokens = {t.strip().lower() for v in fields.getall("Connection", ()) for t in v.split(",")}
    reusable = "close" not in tokens if version == 1 else "keep-alive" in tokens
    if status == 101:
        raise WireError("home switched protocols (HTTP 101), which the broker never asks")
    connection.cap = limit + MAX_HEAD
    if method == "HEAD" or status in (204, 304):
        raw = b""
    elif "Transfer-Encoding" in fields:
        raw = await _read_coded(connection, version, limit, fields, status)
        reusable = False if "Content-Length" in fields else reusable
    elif "Content-Length" in fields:
        length = _content_length(fields.getall("Content-Length"))
        if length > limit:
            raise AnswerTooLarge(limit, status, fields)
        raw = await _read_exactly(connection, length)
    else:
        raw = await _read_to_end(connection, limit, fields, status)
        reusable = False
    if "Content-Encoding" in fields and raw:
        codings = fields.getall("Content-Encoding")
        for coding in reversed([c.strip().lower() for v in codings for c in v.split(",")]):
            if coding not in ("", "identity"):
                raw = _inflated(raw, coding, limit, status, fields)
    content_type = fields.get("Content-Type", "application/octet-stream")
    media = content_type.split(";", 1)[0].strip().lower()
    answer = Answer(status, fields, raw=raw, content_type=media)
    return answer, reusable and not connection.ended and not connection.buffer


async def _read_coded(
    connection: _Connection, version: int, limit: int, fields: CIMultiDict[str], status: int
) -> bytes:
    """A body in transfer codings (RFC 9112 section 6.3): framed by ``chunked`` when that is
    the last, else by the connection's end; the others (gzip, deflate) undone. ``chunked``
    with a Content-Length too (the latter ignored) leaves the connection unusable after it
    (the caller's part); in an HTTP/1.0 answer, Transfer-Encoding is a WireError (section 6.1:
    its framing is faulty)."""
    if version == 0:
        raise WireError("home answered HTTP/1.0 with a Transfer-Encoding")
    codings = [c.strip().lower() for v in fields.getall("Transfer-Encoding") for c in v.split(",")]
    chunked = codings[-1] == "chunked"
    if chunked:
        codings.pop()
    if any(coding not in _INFLATE for coding in codings):
        raise WireError(f"home answered in a transfer coding the broker cannot read: {codings}")
    if chunked:
        raw = await _read_chunked(connection, limit, fields, status)
    else:
        raw = await _read_to_end(connection, limit, fields, status)
    for coding in reversed(codings):
        raw = _inflated(raw, coding, limit, status, fields)
    return raw


async def _read_head(connection: _Connection) -> tuple[int, int, list[tuple[str, str]]]:
    """A status line and header fields, up to CRLF CRLF. A bare CR or LF, or a NUL, anywhere in
    it is a WireError (never a second way to split lines), as is obs-fold."""
    buffer = connection.buffer
    searched = 0
    while (end := buffer.find(b"\r\n\r\n", searched)) < 0:
        if len(buffer) > MAX_HEAD:
            raise WireError(f"home's answer head is longer than {MAX_HEAD} bytes")
        searched = max(0, len(buffer) - 3)
        await connection.more()
    if end > MAX_HEAD - 4:
        raise WireError(f"home's answer head is longer than {MAX_HEAD} bytes")
    head = bytes(buffer[:end])
    del buffer[: end + 4]
    lines = head.split(b"\r\n")
    breaks = len(lines) - 1
    if head.count(b"\n") != breaks or head.count(b"\r") != breaks or b"\x00" in head:
        raise WireError("home answered a head with a bare CR or LF, or a NUL")
    status_line = _STATUS.fullmatch(lines[0])
    if status_line is None:
        raise WireError(f"home answered no HTTP/1.x status line: {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise WireError(f"home answered a malformed header line: {line[:80]!r}")
        headers.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
    return int(status_line[1]), int(status_line[2]), headers


def _content_length(values: list[str]) -> int:
    found = {v.strip() for value in values for v in value.split(",")}
    if (
        len(found) != 1
        or not (length := found.pop()).isdigit()
        or not length.isascii()
        or len(length) > 18
    ):
        raise WireError(f"home answered an unreadable Content-Length: {values!r}")
    return int(length)


async def _read_exactly(connection: _Connection, length: int) -> bytes:
    buffer = connection.buffer
    while len(buffer) < length:
        await connection.more()
    if len(buffer) == length:
        raw = bytes(buffer)
        buffer.clear()
        return raw
    raw = bytes(buffer[:length])
    del buffer[:length]
    return raw


async def _read_to_end(
    connection: _Connection, limit: int, fields: CIMultiDict[str], status: int
) -> bytes:
    buffer = connection.buffer
    while not connection.ended:
        if len(buffer) > limit:
            raise AnswerTooLarge(limit, status, fields)
        try:
            await connection.more()
        except WireError:
            break
    if connection.broken:
        raise WireError("the connection broke (not closed in order) before the answer's end")
    if len(buffer) > limit:
        raise AnswerTooLarge(limit, status, fields)
    raw = bytes(buffer)
    buffer.clear()
    return raw


async def _read_chunked(
    connection: _Connection, limit: int, fields: CIMultiDict[str], status: int
) -> bytes:
    """A ``chunked`` body (RFC 9112 section 7.1), its trailer fields read and dropped."""
    buffer = connection.buffer
    body = bytearray()
    while True:
        while (line_end := buffer.find(b"\r\n")) < 0:
            if len(buffer) > 1024:
                raise WireError("home answered a chunk size line longer than 1024 bytes")
            await connection.more()
        size_text = bytes(buffer[:line_end]).split(b";", 1)[0].strip(b" \t")
        if _HEX.fullmatch(size_text) is None:
            raise WireError(f"home answered an unreadable chunk size: {size_text[:40]!r}")
        size = int(size_text, 16)
        if size == 0:
            del buffer[: line_end + 2]
            break
        if len(body) + size > limit:
            raise AnswerTooLarge(limit, status, fields)
        while len(buffer) < line_end + 2 + size + 2:
            await connection.more()
        start = line_end + 2
        if buffer[start + size : start + size + 2] != b"\r\n":
            raise WireError("home answered a chunk not ended by CRLF")
        body += buffer[start : start + size]
        del buffer[: start + size + 2]
    trailers = 0
    while (end := buffer.find(b"\r\n")) != 0:  # trailer fields, up to the empty line
        if len(buffer) > MAX_HEAD or trailers > MAX_HEAD:
            raise WireError(f"home answered trailer fields longer than {MAX_HEAD} bytes")
        if end < 0:
            await connection.more()
        else:
            trailers += end + 2
            del buffer[: end + 2]
    del buffer[:2]
    return bytes(body)


def _inflated(raw: bytes, coding: str, limit: int, status: int, fields: CIMultiDict[str]) -> bytes:
    """``raw`` without ``coding`` (gzip, deflate: never asked for, but a server may still
    send them); AnswerTooLarge if it inflates beyond ``limit``, WireError if ``raw`` is not
    exactly one whole stream of it (cut short, followed by other bytes, or another coding)."""
    wbits = _INFLATE.get(coding)
    if wbits is None:
        raise WireError(f"home answered in a coding the broker cannot read: {coding!r}")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(raw, limit + 1)
    except zlib.error as exc:
        raise WireError(f"home answered a {coding} body that does not inflate: {exc}") from None
    if len(out) > limit:
        raise AnswerTooLarge(limit, status, fields)
    if not inflater.eof or inflater.unused_data:
        raise WireError(f"home answered a {coding} body cut short or followed by other bytes")
    return out
