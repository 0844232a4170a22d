"""Log records never carry a bearer token (issue 14, class 9).

aiohttp logs a request it cannot parse with the exception, whose text quotes the offending
line: an oversized ``Authorization`` header puts the token in the log. The filter here drops
the parser's text for a malformed request (the client learns it from its 400; the operator
needs only that one came) and masks anything shaped like a credential in every other record.
``broker serve`` puts it on every log handler; :func:`protect_loggers` puts it on aiohttp's
own loggers for any application built by ``create_app``.
"""

from __future__ import annotations

import logging
import re
import traceback

from aiohttp.http_exceptions import HttpProcessingError

__all__ = [
    "AIOHTTP_LOGGERS",
    "RedactingFilter",
    "mask_all",
    "may_hold_secret",
    "protect_handlers",
    "protect_loggers",
    "redact",
]

AIOHTTP_LOGGERS = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
)
_SCHEME = re.compile(r"(?i)\b(bearer|basic|token)(\s+|%20)[^\s'\"\\,;]+")
_HEADER = re.compile(r"(?i)\b(authorization\s*:\s*)(?!bearer\b|basic\b|token\b)[^\s'\"\\,;]+")
_BROKER_TOKEN = re.compile(r"bkr_[A-Za-z0-9_\-]+")
# A password (or secret) as a JSON member, a query parameter or a key=value pair: its value.
# The name's length is bounded, so a long word never makes the search quadratic.
_PASSWORD = re.compile(
    r"(?i)((?:\\?[\"'])?\b\w{0,32}?(?:password|passwd|secret)\w{0,16}(?:\\?[\"'])?\s*[:=]\s*)"
    r"(\"(?:[^\"\\]|\\.)*\"|\\\"(?:[^\"\\]|\\[^\"])*\\\"|'[^']*'|[^\s,;&}]+)"
)
MASK = "[redacted]"


_KEYWORDS = ("bearer", "basic", "token", "authorization", "passw", "secret", "bkr_")
"""A literal that every match of the expressions above holds (case aside): text holding none of
them has nothing to mask. Only for ASCII text: case-insensitive matching also pairs ASCII
letters with a few others (U+0130, U+0131, U+017F, U+212A)."""


def may_hold_secret(text: str) -> bool:
    """Whether :func:`redact` could change ``text`` (False only when it surely would not): the
    four expressions cost about 10 us on an access line; this check well under one."""
    if not text.isascii():
        return True
    lowered = text.lower()
    return any(keyword in lowered for keyword in _KEYWORDS)


def redact(text: str) -> str:
    """``text`` with every bearer (or basic) credential, every broker token and every
    password value masked."""
    return mask_all(text) if may_hold_secret(text) else text


def mask_all(text: str) -> str:
    """:func:`redact` without its quick check: every expression run over ``text``."""
    text = _PASSWORD.sub(lambda m: f"{m.group(1)}{MASK}", text)
    text = _SCHEME.sub(lambda m: f"{m.group(1)} {MASK}", text)
    text = _HEADER.sub(lambda m: f"{m.group(1)}{MASK}", text)
    return _BROKER_TOKEN.sub(f"bkr_{MASK}", text)


class RedactingFilter(logging.Filter):
    """Rewrites each record so that no credential reaches a handler (it never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = redact(record.getMessage())
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            if isinstance(exc, HttpProcessingError):
                # The parser's message quotes the request's bytes: name the fault only.
                message += f": malformed request ({type(exc).__name__}, HTTP {exc.code})"
                record.exc_text = None
            else:
                record.exc_text = redact("".join(traceback.format_exception(exc)).rstrip())
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        record.msg, record.args = message, None
        return True


_FILTER = RedactingFilter()


def protect_loggers(names: tuple[str, ...] = AIOHTTP_LOGGERS) -> None:
    """The filter on the loggers ``names`` (records created there), once."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def protect_handlers(logger: logging.Logger | None = None) -> None:
    """The filter on every handler of ``logger`` (the root by default): whatever logger a
    record comes from, it passes through the filter before it is written."""
    for handler in (logger or logging.getLogger()).handlers:
        if _FILTER not in handler.filters:
            handler.addFilter(_FILTER)
