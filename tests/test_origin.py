"""Attacks on the broker's own HTTP/1.1 client toward home (:mod:`broker.origin`).

Most tests talk to a raw TCP server (``asyncio.start_server``) that reads the request's bytes
and writes scripted answer bytes: a real socket, the only way to say malformed HTTP. A few talk
to a real aiohttp server, a real WSGI server and a real scim2-server home. Nothing here waits
a fixed time or measures one: a test that needs a timeout gives the Origin a small one and a
server that never answers, and asserts only the exception's type.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import socket
import ssl
import struct
import threading
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit
from wsgiref.simple_server import WSGIRequestHandler, make_server

import orjson
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

import broker.origin as origin_module
from broker.http import AnswerTooLarge
from broker.origin import MAX_HEAD, Origin, WireError, _Connection
from tests.scim_support import Home, new_user
from tests.waiting import until

LIMIT = 1 << 20


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


OK5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
GOOD = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nGOOD"


@dataclass(frozen=True)
class Last:
    """Said, and then the server closes the connection."""

    answer: bytes | list[bytes]


Answer = bytes | list[bytes] | Last | None
"""What the scripted server says to one request: bytes (one write), pieces (one write each,
drained in turn), Last (then the connection's end), or None (the end, without a byte)."""


@dataclass
class Wire:
    """A raw TCP server: each request it reads is answered by ``reply``; it counts connections."""

    reply: Callable[[Wire, bytes, asyncio.StreamWriter], Awaitable[bool]]
    requests: list[bytes] = field(default_factory=list)
    accepted: int = 0
    open: int = 0
    most_open: int = 0
    url: str = ""
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.accepted += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while (request := await read_request(reader)) is not None:
                self.requests.append(request)
                if not await self.reply(self, request, writer):
                    break
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request's head and body (by its Content-Length), None when the client has gone."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head + await reader.readexactly(length)


async def say(writer: asyncio.StreamWriter, answer: bytes | list[bytes]) -> None:
    for piece in [answer] if isinstance(answer, bytes) else answer:
        writer.write(piece)
        await writer.drain()


def script(*answers: Answer, keep_open: bool = True) -> Callable[..., Awaitable[bool]]:
    """The n-th request (over all connections) gets ``answers[n]``; the connection then stays
    open (for the client to reuse or not) unless ``keep_open`` is false."""

    async def reply(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
        answer = answers[len(wire.requests) - 1]
        if answer is None:
            return False
        if isinstance(answer, Last):
            await say(writer, answer.answer)
            return False
        await say(writer, answer)
        return keep_open

    return reply


@asynccontextmanager
async def serving(
    reply: Callable[..., Awaitable[bool]],
    base: str = "",
    server_context: ssl.SSLContext | None = None,
) -> AsyncIterator[Wire]:
    """``reply`` served on a port of its own (over TLS with ``server_context``)."""
    wire = Wire(reply)
    server = await asyncio.start_server(wire.serve, "127.0.0.1", 0, ssl=server_context)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if server_context is not None else "http"
    wire.url = f"{scheme}://127.0.0.1:{port}{base}"
    try:
        yield wire
    finally:
        server.close()
        for writer in wire.writers:
            writer.close()
        await server.wait_closed()


@asynccontextmanager
async def origin_for(
    *answers: Answer, seconds: float = 30.0, keep_open: bool = True
) -> AsyncIterator[tuple[Origin, Wire]]:
    async with serving(script(*answers, keep_open=keep_open)) as wire:
        origin = Origin(wire.url, timeout=seconds)
        try:
            yield origin, wire
        finally:
            await origin.close()


async def get(origin: Origin, path: str = "/x", *, limit: int = LIMIT, method: str = "GET") -> Any:
    return await origin.exchange(method, path, headers={}, limit=limit)


# --- Content-Length ---------------------------------------------------------------------------


async def test_content_length_exact_and_reused() -> None:
    async with origin_for(OK5, GOOD) as (origin, wire):
        first = await get(origin)
        second = await get(origin)
    assert (first.status, first.raw, second.raw) == (200, b"hello", b"GOOD")
    assert wire.accepted == 1  # kept alive, reused


async def test_answer_in_many_small_writes() -> None:
    answer = b"HTTP/1.1 201 Created\r\nContent-Type: Application/JSON; x=y\r\n"
    answer += b'Content-Length: 11\r\n\r\n{"a": true}'
    async with origin_for([answer[i : i + 1] for i in range(len(answer))], GOOD) as (o, wire):
        first = await get(o)
        assert await get(o) is not None
    assert (first.status, first.json(), first.content_type) == (
        201,
        {"a": True},
        "application/json",
    )
    assert wire.accepted == 1


@pytest.mark.parametrize(
    "lengths",
    [
        [b"5", b"6"],
        [b"5, 6"],
        [b"abc"],
        [b"-5"],
        [b"+5"],
        [b""],
        [b"5 5"],
        [b"0x5"],
        [b"5.0"],
        ["\u0665".encode()],  # an Arabic-Indic five: str.isdigit says yes
        [b"9" * 5000],  # more digits than int() reads by default
    ],
)
async def test_unreadable_content_length(lengths: list[bytes]) -> None:
    head = b"".join(b"Content-Length: " + length + b"\r\n" for length in lengths)
    async with origin_for(b"HTTP/1.1 200 OK\r\n" + head + b"\r\nhello!") as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


async def test_same_content_length_twice_is_one() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5, 5\r\n\r\nhello"
    async with origin_for(answer) as (origin, _):
        assert (await get(origin)).raw == b"hello"


async def test_content_length_over_limit_is_not_read() -> None:
    answer = [b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"]  # and no body ever
    async with origin_for(answer) as (origin, wire):
        with pytest.raises(AnswerTooLarge) as raised:
            await get(origin, limit=999)
        await until(lambda: wire.open == 0, "the connection closed")
    assert raised.value.status == 200


async def test_body_cut_short_by_close() -> None:
    async with origin_for(
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello", keep_open=False
    ) as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


async def test_extra_bytes_after_body_end_the_connection() -> None:
    async with origin_for(OK5 + b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL", GOOD) as (
        origin,
        wire,
    ):
        assert (await get(origin)).raw == b"hello"
        assert (await get(origin)).raw == b"GOOD"
    assert wire.accepted == 2


# --- chunked ----------------------------------------------------------------------------------

CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize(
    ("chunks", "body"),
    [
        (b"a\r\n0123456789\r\nA\r\nabcdefghij\r\n0\r\n\r\n", b"0123456789abcdefghij"),
        (
            b"1F\r\n" + b"x" * 31 + b"\r\n1f\r\n" + b"y" * 31 + b"\r\n0\r\n\r\n",
            b"x" * 31 + b"y" * 31,
        ),
        (b"05;name=value;flag\r\nhello\r\n0 ; last\r\n\r\n", b"hello"),
        (b"5\r\nhello\r\n0\r\nX-Sum: 1\r\nY: two words\r\n\r\n", b"hello"),
        (b"0\r\n\r\n", b""),
    ],
)
async def test_chunked(chunks: bytes, body: bytes) -> None:
    async with origin_for(CHUNKED + chunks, GOOD) as (origin, wire):
        assert (await get(origin)).raw == body
        assert (await get(origin)).raw == b"GOOD"  # nothing of the first answer left over
    assert wire.accepted == 1


async def test_chunked_in_single_bytes() -> None:
    answer = CHUNKED + b"3;x=y\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n"
    async with origin_for([answer[i : i + 1] for i in range(len(answer))], GOOD) as (o, wire):
        assert (await get(o)).raw == b"abcde"
        assert (await get(o)).raw == b"GOOD"
    assert wire.accepted == 1


@pytest.mark.parametrize(
    "chunks",
    [
        b"5\r\nhelloXX\r\n0\r\n\r\n",  # not ended by CRLF
        b"5\r\nhello\n0\r\n\r\n",
        b"g\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",
        b"5 5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"1" + b"0" * 16 + b"\r\n",  # more hex digits than any size needs
        b"5\nhello\r\n0\r\n\r\n",
    ],
)
async def test_chunked_malformed(chunks: bytes) -> None:
    async with origin_for(CHUNKED + chunks, keep_open=False) as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


async def test_chunk_size_line_without_end() -> None:
    async with origin_for([CHUNKED + b"5;" + b"x" * 5000]) as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


async def test_huge_chunk_size_is_not_read() -> None:
    # Nothing follows the size line: reading the chunk would wait for the Origin's timeout.
    async with origin_for([CHUNKED + b"FFFFFFFFFFFFFFFF\r\n"]) as (origin, wire):
        with pytest.raises(AnswerTooLarge):
            await get(origin)
        await until(lambda: wire.open == 0, "the connection closed")


async def test_many_small_chunks_beyond_limit() -> None:
    async with origin_for([CHUNKED] + [b"1\r\nx\r\n"] * 200) as (origin, _):
        with pytest.raises(AnswerTooLarge):
            await get(origin, limit=100)


async def test_endless_trailer() -> None:
    trailer = b"X-T: " + b"t" * 100 + b"\r\n"
    async with origin_for([CHUNKED + b"1\r\nx\r\n0\r\n"] + [trailer] * 1000) as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


async def test_chunked_wins_over_content_length_and_ends_the_connection() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with origin_for(answer + b"5\r\nhello\r\n0\r\n\r\n", GOOD) as (origin, wire):
        assert (await get(origin)).raw == b"hello"
        assert (await get(origin)).raw == b"GOOD"
    assert wire.accepted == 2  # RFC 9112 section 6.3: framing this odd is not trusted twice


async def test_chunked_in_http10_is_refused() -> None:
    answer = b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    async with origin_for(answer) as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


async def test_transfer_coding_other_than_chunked_is_read_to_close() -> None:
    body = gz(b"zipped")
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\n" + body
    async with origin_for(Last(answer), GOOD) as (origin, wire):
        assert (await get(origin)).raw == b"zipped"
        assert (await get(origin)).raw == b"GOOD"
    assert wire.accepted == 2


async def test_gzip_then_chunked_transfer_codings() -> None:
    body = gz(b"zipped and chunked")
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    answer += b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    async with origin_for(answer) as (origin, _):
        assert (await get(origin)).raw == b"zipped and chunked"


@pytest.mark.parametrize(
    "codings", [b"br", b"chunked, chunked", b"chunked, gzip", b"", b"br, chunked"]
)
async def test_transfer_coding_unknown(codings: bytes) -> None:
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + codings + b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    async with origin_for(answer, keep_open=False) as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


# --- no length: to the connection's end --------------------------------------------------------


async def test_read_to_close() -> None:
    release = asyncio.Event()

    async def reply(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if len(wire.requests) > 1:
            await say(writer, GOOD)
            return True
        await say(writer, b"HTTP/1.1 200 OK\r\n\r\nhel")
        await release.wait()
        await say(writer, b"lo")
        return False

    async with serving(reply) as wire:
        origin = Origin(wire.url, timeout=30)
        task = asyncio.create_task(get(origin))
        await until(lambda: wire.requests, "the request came")
        assert not task.done()  # the body ends only with the connection
        release.set()
        assert (await task).raw == b"hello"
        assert (await get(origin)).raw == b"GOOD"
        await origin.close()
    assert wire.accepted == 2


def reset(writer: asyncio.StreamWriter) -> None:
    """End the connection with a TCP reset (RST), not an orderly close (FIN)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",
        CHUNKED + b"3\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",
    ],
)
async def test_reset_is_no_end_of_body(head: bytes) -> None:
    """A reset connection cut the answer short: only an orderly close ends a body."""

    async def reply(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
        await say(writer, head + b"hel")
        reset(writer)
        return False

    async with origin_for() as (origin, wire):
        wire.reply = reply  # type: ignore[method-assign]
        with pytest.raises(WireError):
            await get(origin)


@pytest.mark.parametrize(("size", "fits"), [(10, True), (11, False)])
async def test_read_to_close_bounded(size: int, fits: bool) -> None:
    answer = b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * size
    async with origin_for(answer, keep_open=False) as (origin, _):
        if fits:
            assert (await get(origin, limit=10)).raw == b"x" * 10
        else:
            with pytest.raises(AnswerTooLarge):
                await get(origin, limit=10)


async def endless(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
    writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
    while True:  # until the client goes (ConnectionError)
        writer.write(b"x" * 65536)
        await writer.drain()


async def test_endless_answer_is_too_large() -> None:
    async with serving(endless) as wire:
        origin = Origin(wire.url, timeout=30)
        with pytest.raises(AnswerTooLarge):
            await get(origin, limit=100_000)
        await until(lambda: wire.open == 0, "the connection closed")


async def test_reading_pauses_at_cap() -> None:
    """A sender faster than the reader fills no more than ``cap`` (and one read) of memory."""
    async with serving(endless) as wire:
        loop = asyncio.get_running_loop()
        host, port = urlsplit(wire.url).hostname, urlsplit(wire.url).port
        transport, connection = await loop.create_connection(lambda: _Connection(loop), host, port)
        try:
            transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            for _ in range(3):
                await until(lambda: not transport.is_reading(), "reading paused")
                # asyncio reads at most 256 KiB at once: past the cap by less than that.
                assert connection.cap < len(connection.buffer) <= connection.cap + (256 << 10)
                connection.buffer.clear()
                await connection.more()  # resumes reading
        finally:
            transport.close()


# --- heads ------------------------------------------------------------------------------------


async def test_head_without_end_within_max_head() -> None:
    answer = [b"HTTP/1.1 200 OK\r\n"] + [b"X-Pad: " + b"p" * 1000 + b"\r\n"] * 70
    async with origin_for(answer) as (origin, wire):
        with pytest.raises(WireError):
            await get(origin)
        await until(lambda: wire.open == 0, "the connection closed")


async def test_head_at_max_head_is_read() -> None:
    start = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Pad: "
    pad = b"p" * (MAX_HEAD - len(start) - 4)
    async with origin_for(start + pad + b"\r\n\r\n") as (origin, _):
        assert (await get(origin)).headers["X-Pad"] == pad.decode()


@pytest.mark.parametrize(
    "status_line",
    [
        b"HTTP/2 200 OK",
        b"HTTP/2.0 200 OK",
        b"HTTP/1.2 200 OK",
        b"http/1.1 200 OK",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1  200 OK",
        b"HTTP/1.1 200OK",
        b"HTTP/1.1 200 O\x00K",
        b"HTTP/1.1 200 O\rK",
        b"ICY 200 OK",
        b" HTTP/1.1 200 OK",
        b"",
    ],
)
async def test_status_line_not_http1(status_line: bytes) -> None:
    async with origin_for(status_line + b"\r\nContent-Length: 0\r\n\r\n") as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


@pytest.mark.parametrize(
    "lines",
    [
        b"X-A: 1\r\n folded\r\n",  # obs-fold
        b"X-A: 1\r\n\tfolded: 2\r\n",
        b" X-A: 1\r\n",
        b"X A: 1\r\n",
        b"X-A : 1\r\n",
        b": 1\r\n",
        b"X-A\r\n",
        b"X\x00A: 1\r\n",
        "X-\u00e4: 1\r\n".encode(),
        b"X-A: 1\x002\r\n",
        b"X-A: 1\r2\r\n",
        b"X-A: 1\nContent-Length: 2\r\n",  # a bare LF: one parser's header, another's two
        b"X-A: 1\n\r\n",
    ],
)
async def test_malformed_header_lines(lines: bytes) -> None:
    answer = b"HTTP/1.1 200 OK\r\n" + lines + b"Content-Length: 5\r\n\r\nhello"
    async with origin_for(answer) as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


async def test_header_values_kept() -> None:
    answer = b"HTTP/1.1 200 OK\r\nX-A:1\r\nX-B: \t two  words \t\r\nX-C: caf\xe9\r\nX-A: 2\r\n"
    async with origin_for(answer + b"Content-Length: 0\r\n\r\n") as (origin, _):
        headers = (await get(origin)).headers
    assert headers.getall("x-a") == ["1", "2"]
    assert (headers["X-B"], headers["X-C"]) == ("two  words", "caf\u00e9")


LF_ONLY = b"HTTP/1.1 200 OK\nContent-Length: 2\n\nhi"


async def test_lf_only_head_held_open_times_out() -> None:
    # Decided: a head ends only at CRLF CRLF (bare LF is refused); one with LF endings
    # waits for more and ends at the timeout, or at MAX_HEAD, or at the connection's end.
    async with origin_for(LF_ONLY, seconds=0.2) as (origin, wire):
        with pytest.raises(TimeoutError):
            await get(origin)
        await until(lambda: wire.open == 0, "the connection closed")


async def test_lf_only_head_then_close() -> None:
    async with origin_for(LF_ONLY, keep_open=False) as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


# --- interim and bodiless answers ---------------------------------------------------------------


async def test_interim_answers_skipped() -> None:
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n"
    )
    async with origin_for([answer, OK5], GOOD) as (origin, wire):
        first = await get(origin)
        assert (await get(origin)).raw == b"GOOD"
    assert (first.status, first.raw, "Link" in first.headers) == (200, b"hello", False)
    assert wire.accepted == 1


async def test_endless_interim_answers() -> None:
    async with origin_for([b"HTTP/1.1 100 Continue\r\n\r\n"] * 2000, seconds=10) as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


async def test_switching_protocols_refused() -> None:
    answer = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    async with origin_for(answer) as (origin, wire):
        with pytest.raises(WireError):
            await get(origin)
        await until(lambda: wire.open == 0, "the connection closed")


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 4\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
async def test_bodiless_answers_do_not_read_what_follows(head: bytes) -> None:
    forged = b"4\r\nEVIL\r\n0\r\n\r\n" if b"chunked" in head else b"EVIL"
    async with origin_for(head + forged, GOOD) as (origin, wire):
        first = await get(origin)
        second = await get(origin)
    assert (first.raw, second.raw) == (b"", b"GOOD")
    assert wire.accepted == 2  # what followed was garbage: the connection was not reused


async def test_bodiless_answer_garbage_after_it_returned() -> None:
    """Bytes that come after a 204 was read make its idle connection unusable."""
    state: dict[str, asyncio.StreamWriter] = {}

    async def reply(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if wire.accepted == 1 and len(wire.requests) == 1:
            state["first"] = writer
            await say(writer, b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            await say(writer, GOOD)
        return True

    async with serving(reply) as wire:
        origin = Origin(wire.url, timeout=30)
        assert (await get(origin)).status == 204
        await say(state["first"], GOOD.replace(b"GOOD", b"EVIL"))
        await until(lambda: origin._idle and origin._idle[0].buffer, "the garbage came")
        assert (await get(origin)).raw == b"GOOD"
        await origin.close()
    assert wire.accepted == 2


async def test_head_request_reads_no_body() -> None:
    async with origin_for(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", GOOD) as (o, wire):
        assert (await get(o, method="HEAD")).raw == b""
        assert (await get(o)).raw == b"GOOD"
    assert wire.accepted == 1


# --- keep-alive ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "reused"),
    [
        (b"HTTP/1.0 200 OK\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Upgrade, Close\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n", True),
        (b"HTTP/1.1 200 OK\r\n", True),
    ],
)
async def test_keep_alive(head: bytes, reused: bool) -> None:
    # The server keeps every connection open: only the client decides.
    answer = head + b"Content-Length: 5\r\n\r\nhello"
    async with origin_for(answer, answer) as (origin, wire):
        assert (await get(origin)).raw == b"hello"
        assert (await get(origin)).raw == b"hello"
    assert wire.accepted == (1 if reused else 2)


async def test_idle_too_long_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    async with origin_for(OK5, GOOD) as (origin, wire):
        assert (await get(origin)).raw == b"hello"
        monkeypatch.setattr(origin_module, "KEEP_IDLE", 0.0)
        assert (await get(origin)).raw == b"GOOD"
        await until(lambda: wire.open == 1, "the idle connection closed")
    assert wire.accepted == 2


async def test_close_ends_idle_and_busy_connections() -> None:
    release = asyncio.Event()

    async def reply(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if request.startswith(b"GET /slow "):
            await release.wait()
        await say(writer, OK5)
        return True

    async with serving(reply) as wire:
        origin = Origin(wire.url, timeout=30)
        await get(origin)  # one idle connection
        slow = asyncio.create_task(get(origin, "/slow"))  # takes it
        await until(lambda: len(wire.requests) == 2, "the slow request came")
        await get(origin)  # a second connection, idle again
        assert wire.open == 2
        await origin.close()
        await until(lambda: wire.open == 1, "the idle connection closed")
        release.set()
        assert (await slow).raw == b"hello"
        await until(lambda: wire.open == 0, "the busy connection closed after its answer")


# --- stale connections and retries ------------------------------------------------------------


async def test_idle_connection_end_seen_after_a_large_answer() -> None:
    """An answer longer than a head came at once (reading paused): the connection goes idle
    reading again, so home's closing it is seen before a POST is sent on it."""
    body = b"b" * 100_000  # more than a head (MAX_HEAD), and within one read
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    async with origin_for(big, GOOD) as (origin, wire):
        assert (await get(origin)).raw == body
        [writer] = wire.writers
        writer.close()
        await until(lambda: origin._idle[0].ended, "the client saw the connection end")
        answer = await origin.exchange("POST", "/x", headers={}, data=b"{}", limit=LIMIT)
    assert (answer.raw, wire.accepted) == (b"GOOD", 2)


async def test_stale_connection_get_retried_once() -> None:
    async with origin_for(OK5, None, GOOD) as (origin, wire):
        assert (await get(origin)).raw == b"hello"
        assert (await get(origin)).raw == b"GOOD"  # sent twice: closed unanswered, then anew
    assert (wire.accepted, len(wire.requests)) == (2, 3)


async def test_retried_only_once() -> None:
    async with origin_for(OK5, None, None, GOOD) as (origin, wire):
        assert (await get(origin)).raw == b"hello"
        with pytest.raises(WireError):
            await get(origin)
    assert (wire.accepted, len(wire.requests)) == (2, 3)


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_stale_connection_post_not_retried(method: str) -> None:
    async with origin_for(OK5, None, GOOD) as (origin, wire):
        assert (await get(origin)).raw == b"hello"
        with pytest.raises(WireError):
            await origin.exchange(method, "/x", headers={}, data=b"{}", limit=LIMIT)
    assert (wire.accepted, len(wire.requests)) == (1, 2)  # home saw it once


@pytest.mark.parametrize(
    "started",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n",  # a head, then the end
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhel",
        b"HTTP/1.1 2",
        b"HTTP/9 200 OK\r\n\r\n",  # a malformed head
        b"HTTP/1.1 100 Continue\r\n\r\n",
    ],
)
async def test_started_answer_never_retried(started: bytes) -> None:
    async with origin_for(OK5, Last(started), GOOD) as (origin, wire):
        assert (await get(origin)).raw == b"hello"
        with pytest.raises(WireError):
            await get(origin)
    assert (wire.accepted, len(wire.requests)) == (1, 2)


# --- timeouts and cancellation ------------------------------------------------------------------


async def never(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
    # Keyed by path, not by order: on a loaded machine the client may time out before it has
    # written its first request, and the next one must not meet this silence.
    if request.startswith(b"GET /first "):
        return True  # no answer, and the connection stays open
    await say(writer, GOOD)
    return True


async def test_no_answer_times_out_and_closes() -> None:
    async with serving(never) as wire:
        origin = Origin(wire.url, timeout=0.2)
        with pytest.raises(TimeoutError):
            await get(origin, "/first")
        await until(lambda: wire.open == 0, "the connection closed")
        origin.timeout = 30
        assert (await get(origin)).raw == b"GOOD"
        await origin.close()
    assert wire.accepted >= 2  # (a connection timed out early may be accepted late)


def half_then_forge(sent: asyncio.Event, release: asyncio.Event) -> Callable[..., Awaitable[bool]]:
    async def reply(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if not request.startswith(b"GET /first "):
            await say(writer, GOOD)
            return True
        await say(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n01234")
        sent.set()
        await release.wait()
        # The rest of the first answer, and a forged answer for whatever comes next.
        await say(writer, b"56789HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL")
        return True

    return reply


@pytest.mark.parametrize("kept", [False, True], ids=["new connection", "kept connection"])
async def test_cancelled_mid_answer_never_desyncs(kept: bool) -> None:
    """Also on a kept connection, where the request is bounded by a timer of its own."""
    sent, release = asyncio.Event(), asyncio.Event()
    async with serving(half_then_forge(sent, release)) as wire:
        origin = Origin(wire.url, timeout=30)
        if kept:
            assert (await get(origin, "/warm")).raw == b"GOOD"  # the connection is kept
        task = asyncio.create_task(get(origin, "/first"))
        await sent.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        second = [await get(origin) for _ in range(2)]
        await origin.close()
    assert [a.raw for a in second] == [b"GOOD", b"GOOD"]
    assert wire.accepted == 2


async def test_timeout_mid_answer_never_desyncs() -> None:
    sent, release = asyncio.Event(), asyncio.Event()
    async with serving(half_then_forge(sent, release)) as wire:
        origin = Origin(wire.url, timeout=0.2)
        with pytest.raises(TimeoutError):
            await get(origin, "/first")
        release.set()
        origin.timeout = 30
        assert (await get(origin)).raw == b"GOOD"
        await origin.close()
    assert wire.accepted >= 2  # (a connection timed out early may be accepted late)


async def second_stalls(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
    """``/first`` is answered and its connection kept; ``/second`` gets half an answer the
    connection's end would delimit, then nothing; anything else is answered."""
    if request.startswith(b"GET /first "):
        await say(writer, GOOD)
    elif request.startswith(b"GET /second "):
        await say(writer, b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nHALF")
    else:
        await say(writer, GOOD)
    return True


async def test_a_reused_connection_that_stalls_times_out_and_is_never_an_answer() -> None:
    """The request on a kept connection is bounded by a timer of its own (not asyncio.timeout,
    issue 15): when it fires, the half answer the connection's end would have delimited is a
    TimeoutError, never a body cut short; the next request goes on a new connection."""
    async with serving(second_stalls) as wire:
        origin = Origin(wire.url, timeout=30)
        assert (await get(origin, "/first")).raw == b"GOOD"
        origin.timeout = 0.2
        with pytest.raises(TimeoutError):
            await get(origin, "/second")
        await until(lambda: wire.open == 0, "the stalled connection closed")
        origin.timeout = 30
        assert (await get(origin, "/third")).raw == b"GOOD"
        await origin.close()
    assert wire.accepted == 2
    assert [request_line(r) for r in wire.requests] == [
        b"GET /first HTTP/1.1",
        b"GET /second HTTP/1.1",
        b"GET /third HTTP/1.1",
    ]


async def test_a_request_waiting_for_a_slot_is_bounded_by_the_timeout_and_frees_nothing() -> None:
    """With one connection allowed and it stalled, a second request waits for the slot and
    times out; a cancelled wait hands no slot away, and the slot serves once freed."""
    stalled, release = asyncio.Event(), asyncio.Event()

    async def reply(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
        if request.startswith(b"GET /stall "):
            stalled.set()
            await release.wait()
        await say(writer, GOOD)
        return True

    async with serving(reply) as wire:
        origin = Origin(wire.url, timeout=30, connections=1)
        first = asyncio.create_task(get(origin, "/stall"))
        await stalled.wait()
        origin.timeout = 0.2
        with pytest.raises(TimeoutError):
            await get(origin, "/waits")
        cancelled = asyncio.create_task(get(origin, "/cancelled"))
        await until(lambda: len(origin._waiting) == 1, "the request waits for the slot")
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        origin.timeout = 30
        release.set()
        assert (await first).raw == b"GOOD"
        assert (await get(origin, "/after")).raw == b"GOOD"
        await origin.close()
    assert (wire.accepted, wire.most_open) == (1, 1)
    assert b"GET /waits HTTP/1.1" not in [request_line(r) for r in wire.requests]


async def test_a_slot_handed_to_a_wait_cancelled_before_it_resumed_is_not_lost() -> None:
    origin = Origin("http://127.0.0.1:9", timeout=30, connections=1)
    await origin._acquire()
    waiter = asyncio.create_task(origin._acquire())
    await until(lambda: len(origin._waiting) == 1, "the second request waits")
    origin._release()  # the slot goes to the waiting request...
    waiter.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert origin._busy == 0, "the slot was passed on, not lost"
    await origin._acquire()  # and it serves the next request at once
    assert origin._busy == 1


# --- the request ------------------------------------------------------------------------------


def request_line(request: bytes) -> bytes:
    return request.split(b"\r\n", 1)[0]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("X-A", "1\r\nX-B: 2"),
        ("X-A", "1\n"),
        ("X-A", "1\r"),
        ("X-A", "1\x00"),
        ("X-A\r\nX-B", "1"),
        ("X-A\n", "1"),
        ("X\x00", "1"),
        ("X A", "1"),
        ("X:A", "1"),
        ("", "1"),
        ("X-A", "\u20ac"),  # not latin-1
        ("Content-Length", "0"),  # the framing is the client's
        ("transfer-encoding", "chunked"),
        ("Host", "elsewhere"),
        ("Connection", "close"),
    ],
)
async def test_request_header_refused_before_any_byte(name: str, value: str) -> None:
    async with origin_for(OK5) as (origin, wire):
        with pytest.raises(ValueError):
            await origin.exchange("GET", "/x", headers={name: value}, limit=LIMIT)
    assert wire.accepted == 0


@pytest.mark.parametrize("method", ["GET /x HTTP/1.1\r\nX: y\r\n", "GE T", "", "G\x00"])
async def test_request_method_refused(method: str) -> None:
    async with origin_for(OK5) as (origin, wire):
        with pytest.raises(ValueError):
            await get(origin, method=method)
    assert wire.accepted == 0


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/Users/a b", b"/v2/Users/a%20b"),
        ("/Users/a\r\nX: y", b"/v2/Users/a%0D%0AX:%20y"),
        ("/Users/a\tb", b"/v2/Users/a%09b"),
        ("/Users/a?b=c", b"/v2/Users/a%3Fb=c"),
        ("/Users/a#frag", b"/v2/Users/a%23frag"),
        ("/Users/\u00e9\u2028", b"/v2/Users/%C3%A9%E2%80%A8"),
        ("/Users/a\x00b", b"/v2/Users/a%00b"),
        ("/Users/a%2Fb", b"/v2/Users/a%2Fb"),  # quoted by the caller: kept as it is
        ("/Users/.search", b"/v2/Users/.search"),
        ("/Users/a..b", b"/v2/Users/a..b"),
    ],
)
async def test_path_sent_encoded(path: str, target: bytes) -> None:
    async with serving(script(OK5), base="/v2") as wire:
        origin = Origin(wire.url, timeout=30)
        await get(origin, path)
        await origin.close()
    assert request_line(wire.requests[0]) == b"GET " + target + b" HTTP/1.1"


@pytest.mark.parametrize(
    "path", ["/Users/../../admin", "/Users/%2e%2E/x", "/Users/./x", "/..", "/Users/.%2E", "/x/."]
)
async def test_path_dot_segments_refused(path: str) -> None:
    async with serving(script(OK5), base="/v2") as wire:
        origin = Origin(wire.url, timeout=30)
        with pytest.raises(ValueError):
            await get(origin, path)
    assert wire.accepted == 0


async def test_params_encoded() -> None:
    params = {"filter": 'userName eq "a b&c=d"\r\nX: y', "x#": "\u00e9?+%"}
    async with serving(script(OK5), base="/v2") as wire:
        origin = Origin(wire.url, timeout=30)
        await origin.exchange("GET", "/Users", headers={}, params=params, limit=LIMIT)
        await origin.close()
    line = request_line(wire.requests[0])
    method, target, version = line.split(b" ")
    parts = urlsplit(target.decode("ascii"))
    assert (method, parts.path, version) == (b"GET", "/v2/Users", b"HTTP/1.1")
    assert {k: v[0] for k, v in parse_qs(parts.query).items()} == params


@pytest.mark.parametrize(
    ("method", "data", "length"),
    [("POST", b'{"a": 1}', b"8"), ("PUT", None, b"0"), ("PATCH", b"", b"0"), ("GET", None, None)],
)
async def test_request_framing(method: str, data: bytes | None, length: bytes | None) -> None:
    async with serving(script(OK5)) as wire:
        origin = Origin(wire.url, timeout=30)
        headers = {"Authorization": "Bearer t", "Accept": "application/scim+json"}
        await origin.exchange(method, "/x", headers=headers, data=data, limit=LIMIT)
        await origin.close()
    head, _, body = wire.requests[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    port = urlsplit(wire.url).port
    assert lines[0] == method.encode() + b" /x HTTP/1.1"
    assert f"Host: 127.0.0.1:{port}".encode() in lines
    assert b"Authorization: Bearer t" in lines
    sent = [line.split(b": ", 1)[1] for line in lines if line.startswith(b"Content-Length:")]
    assert sent == ([length] if length is not None else [])
    assert body == (data or b"")


# --- content codings ----------------------------------------------------------------------------


def coded(coding: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: " + coding + b"\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(body) + body


@pytest.mark.parametrize(
    ("coding", "body"),
    [
        (b"gzip", gz(b'{"a": 1}')),
        (b"x-gzip", gz(b'{"a": 1}')),
        (b"GZIP", gz(b'{"a": 1}')),
        (b"deflate", zlib.compress(b'{"a": 1}')),
        (b"identity", b'{"a": 1}'),
    ],
)
async def test_content_coding_inflated(coding: bytes, body: bytes) -> None:
    async with origin_for(coded(coding, body)) as (origin, _):
        assert (await get(origin)).raw == b'{"a": 1}'


async def test_gzip_bomb_is_too_large() -> None:
    bomb = gz(b"\0" * (64 << 20))
    assert len(bomb) < LIMIT
    async with origin_for(coded(b"gzip", bomb)) as (origin, _):
        with pytest.raises(AnswerTooLarge):
            await get(origin)


@pytest.mark.parametrize(
    "answer",
    [
        coded(b"br", b"\x0b\x02\x80hello\x03"),
        coded(b"gzip, br", b"x"),
        coded(b"gzip", b"not gzip at all"),
        coded(b"gzip", gz(b"x" * 1000)[:-12]),  # cut short
        coded(b"gzip", gz(b"hello") + b"trailing"),
        coded(b"gzip", gz(b"hello") + gz(b"EVIL")),
        coded(b"deflate", zlib.compress(b"hello")[:-2]),
        coded(b"gzip", gz(b"hello")).replace(
            b"Content-Encoding: gzip\r\n", b"Content-Encoding: gzip\r\nContent-Encoding: br\r\n"
        ),
    ],
)
async def test_content_coding_unreadable(answer: bytes) -> None:
    async with origin_for(answer) as (origin, _):
        with pytest.raises(WireError):
            await get(origin)


# --- the connection limit -----------------------------------------------------------------------


async def test_connection_limit() -> None:
    async def echo(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
        # Answers are held until the client has had every chance to open its ten connections.
        await until(lambda: wire.accepted >= 2, "two connections")
        await asyncio.sleep(0)
        target = request_line(request).split(b" ")[1]
        await say(
            writer, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(target), target)
        )
        return True

    async with serving(echo) as wire:
        origin = Origin(wire.url, timeout=30, connections=2)
        answers = await asyncio.gather(*(get(origin, f"/{n}") for n in range(10)))
        await origin.close()
    assert [a.raw for a in answers] == [f"/{n}".encode() for n in range(10)]
    assert (wire.accepted, wire.most_open) == (2, 2)


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a self-signed certificate for 127.0.0.1, and a client context
    trusting only it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "home.test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    (directory / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    client = ssl.create_default_context(cafile=str(directory / "cert.pem"))
    return server, client


def serving_tls(
    reply: Callable[..., Awaitable[bool]], server_context: ssl.SSLContext
) -> AbstractAsyncContextManager[Wire]:
    return serving(reply, server_context=server_context)


async def test_tls_keep_alive_and_orderly_close(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    answers = script(OK5, Last(b"HTTP/1.1 200 OK\r\n\r\nto the end"))
    async with serving_tls(answers, tls[0]) as wire:
        origin = Origin(wire.url, timeout=30, ssl_context=tls[1])
        assert (await get(origin)).raw == b"hello"
        assert (await get(origin)).raw == b"to the end"  # closed with TLS close_notify
        await origin.close()
    assert wire.accepted == 1


async def test_tls_large_answer_to_orderly_close(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """More than a head at once (reading pauses, and the TCP end may come meanwhile), then
    close_notify: a whole body."""
    body = bytes(range(256)) * 1000
    answers = script(Last(b"HTTP/1.0 200 OK\r\n\r\n" + body))
    async with serving_tls(answers, tls[0]) as wire:
        origin = Origin(wire.url, timeout=30, ssl_context=tls[1])
        assert (await get(origin)).raw == body
        await origin.close()


async def tls_by_hand(
    context: ssl.SSLContext,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    answer: bytes,
    then: asyncio.Event,
    *,
    orderly: bool,
) -> None:
    """A TLS server in memory over a plain stream: it answers and, once ``then`` is set, sends
    close_notify (if ``orderly``) and its TCP end at once, not waiting for the client's
    close_notify (as servers that shut TLS down one way do)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_object = context.wrap_bio(incoming, outgoing, server_side=True)

    async def pumped(operation: Callable[[], Any]) -> Any:
        while True:
            try:
                result = operation()
            except ssl.SSLWantReadError:
                await say(writer, outgoing.read())
                incoming.write(await reader.read(65536) or b"")
            else:
                await say(writer, outgoing.read())
                return result

    await pumped(tls_object.do_handshake)
    request = b""
    while b"\r\n\r\n" not in request:
        request += await pumped(lambda: tls_object.read(65536))
    tls_object.write(answer)
    await say(writer, outgoing.read())
    await then.wait()
    if orderly:
        with suppress(ssl.SSLWantReadError):
            tls_object.unwrap()  # close_notify, into ``outgoing``
    await say(writer, outgoing.read())
    writer.write_eof()


@pytest.mark.parametrize("orderly", [True, False])
async def test_tls_end_seen_while_reading_paused(
    tls: tuple[ssl.SSLContext, ssl.SSLContext], orderly: bool
) -> None:
    """The TCP end comes while reading is paused: close_notify before it is still an orderly
    end, and its absence a broken one (asyncio's TLS states, which origin.py reads)."""
    done, paused = asyncio.Event(), asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answer = b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 100
        await tls_by_hand(tls[0], reader, writer, answer, paused, orderly=orderly)
        await done.wait()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    transport, connection = await loop.create_connection(
        lambda: _Connection(loop, tls=True),
        "127.0.0.1",
        server.sockets[0].getsockname()[1],
        ssl=tls[1],
        server_hostname="127.0.0.1",
    )
    try:
        connection.cap = 0  # reading pauses at the first bytes
        transport.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: not transport.is_reading(), "reading paused")
        paused.set()
        tls_layer = transport._ssl_protocol  # type: ignore[attr-defined]
        await until(lambda: tls_layer._eof_received, "the TCP end came")
        assert tls_layer._state.name == "FLUSHING"
        while not connection.ended:
            await connection.more()
        assert connection.buffer.endswith(b"x" * 100)
        assert connection.broken is not orderly
    finally:
        transport.close()
        done.set()
        server.close()
        await server.wait_closed()


async def test_tls_truncation_is_no_end_of_body(
    tls: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A TCP FIN without TLS close_notify (what an attacker on the path can send) does not end
    a body framed by the connection's end."""

    async def reply(wire: Wire, request: bytes, writer: asyncio.StreamWriter) -> bool:
        await say(writer, b"HTTP/1.1 200 OK\r\n\r\nhalf of it")
        writer.get_extra_info("socket").shutdown(socket.SHUT_WR)
        return True  # (the server's reading side stays until the client goes)

    async with serving_tls(reply, tls[0]) as wire:
        origin = Origin(wire.url, timeout=30, ssl_context=tls[1])
        with pytest.raises(WireError):
            await get(origin)
        await origin.close()


async def test_tls_certificate_checked(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    async with serving_tls(script(OK5), tls[0]) as wire:
        origin = Origin(wire.url, timeout=30)  # the system's roots: the test's is not among them
        with pytest.raises(ssl.SSLCertVerificationError):
            await get(origin)
    assert not wire.requests


# --- real servers -------------------------------------------------------------------------------


async def test_real_aiohttp_server_keep_alive_and_chunked() -> None:
    peers: list[object] = []

    async def plain(request: web.Request) -> web.Response:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        return web.json_response({"path": request.path, "q": request.query.get("q")})

    async def streamed(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername") if request.transport else None)
        response = web.StreamResponse()
        await response.prepare(request)  # HTTP/1.1 with no length: chunked
        for n in range(50):
            await response.write(b"%d," % n)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v2/Users", plain)
    app.router.add_get("/v2/stream", streamed)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        origin = Origin(f"http://127.0.0.1:{port}/v2", timeout=30)
        for n in range(3):
            answer = await origin.exchange(
                "GET", "/Users", headers={}, params={"q": f"a b{n}"}, limit=LIMIT
            )
            assert answer.json() == {"path": "/v2/Users", "q": f"a b{n}"}
        streamed_answer = await get(origin, "/stream")
        assert streamed_answer.raw == b"".join(b"%d," % n for n in range(50))
        await origin.close()
    finally:
        await runner.cleanup()
    assert len(peers) == 4 and len(set(peers)) == 1  # one connection, kept alive


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def wsgi_streaming() -> Iterator[str]:
    """A real WSGI server (HTTP/1.0) answering with no length: its body ends at the close."""

    def app(environ: dict[str, Any], start: Callable[..., Any]) -> Iterator[bytes]:
        start("200 OK", [("Content-Type", "text/plain")])
        for n in range(100):
            yield b"%d;" % n

    server = make_server("127.0.0.1", 0, app, handler_class=_Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_real_wsgi_server_close_delimited() -> None:
    with wsgi_streaming() as url:
        origin = Origin(url, timeout=30)
        for _ in range(3):
            answer = await get(origin, "/anything")
            assert answer.raw == b"".join(b"%d;" % n for n in range(100))
        assert not origin._idle  # HTTP/1.0 with no keep-alive: never reused
        await origin.close()


async def test_real_home(home: Home) -> None:
    origin = Origin(home.url, timeout=30)
    headers = {"Authorization": f"Bearer {home.token}", "Content-Type": "application/scim+json"}
    user = new_user()
    created = await origin.exchange(
        "POST", "/Users", headers=headers, data=orjson.dumps(user), limit=LIMIT
    )
    assert created.status == 201, created.raw
    internal = created.json()["id"]
    read = await origin.exchange("GET", f"/Users/{internal}", headers=headers, limit=LIMIT)
    assert (read.status, read.json()["userName"]) == (200, user["userName"])
    found = await origin.exchange(
        "GET",
        "/Users",
        headers=headers,
        params={"filter": f'userName eq "{user["userName"]}"'},
        limit=LIMIT,
    )
    assert [r["id"] for r in found.json()["Resources"]] == [internal]
    missing = await origin.exchange("GET", "/Users/no such one", headers=headers, limit=LIMIT)
    assert missing.status == 404
    with pytest.raises(AnswerTooLarge):
        await origin.exchange("GET", "/Users", headers=headers, limit=10)
    gone = await origin.exchange("DELETE", f"/Users/{internal}", headers=headers, limit=LIMIT)
    assert gone.status == 204
    assert not origin._idle  # home answers HTTP/1.0 without keep-alive: nothing kept
    await origin.close()
