"""Where a peer's outbound credential is kept, and reading it there.

A domain's ``credential_ref`` names the place, never the secret: ``env:VAR`` (an environment
variable of the broker's processes, read when used) or ``file:PATH`` (a file, read again
whenever it changes: its modification time and size are looked at before each use, and
:func:`forget_files` drops what was read, as ``broker serve`` does on SIGHUP). A token file
lets an operator change a peer's token without restarting anything.
"""

from __future__ import annotations

import os
import stat as stat_mode
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from broker.config import Config

__all__ = [
    "MAX_TOKEN_BYTES",
    "NOTHING_RESERVED",
    "CredentialProblem",
    "Reserved",
    "credential_ref",
    "describe_ref",
    "forget_files",
    "read_credential",
    "reserved_problem",
    "reserved_secrets",
]

MAX_TOKEN_BYTES = 8192
"""The longest token file line taken as a token; a longer one is refused, never read whole."""


class CredentialProblem(Exception):
    """The credential cannot be read; the message says what to do. ``permanent``: the reference
    itself is wrong (a retry will not help)."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class _Read:
    mtime_ns: int
    size: int
    value: str


_files: dict[str, _Read] = {}


def credential_ref(token_env: str | None, token_file: str | None) -> str | None:
    """The reference ``--token-env VAR`` or ``--token-file PATH`` make (at most one of them);
    a file's path is made absolute, so every process finds it wherever it was started."""
    if token_env and token_file:
        raise ValueError("give --token-env or --token-file, not both")
    if token_env:
        return f"env:{token_env}"
    if token_file:
        return f"file:{Path(token_file).expanduser().resolve()}"
    return None


@dataclass(frozen=True)
class Reserved:
    """What only the broker itself may read: the variables it takes its own secrets from (the
    home's token, the sealing key) and the files and directories that hold them (the key file,
    the embedded data directory). Every ``BROKER_*`` variable is reserved as well."""

    env: frozenset[str] = frozenset()
    paths: tuple[Path, ...] = ()


NOTHING_RESERVED = Reserved()
"""No configured secret (tests that build the admin application themselves); ``BROKER_*``
variables are reserved all the same."""


def reserved_secrets(config: Config) -> Reserved:
    """The secrets ``config`` has the broker read for itself: the home's token variable, the
    sealing key's variable or file, and the data directory (``outbox.key``, PostgreSQL's files)."""
    env = {config.home.token_env, config.propagation.secret_key_env}
    paths = [config.database.data_dir]
    if config.propagation.secret_key_file is not None:
        paths.append(config.propagation.secret_key_file)
    return Reserved(frozenset(e for e in env if e), tuple(paths))


def reserved_problem(ref: str | None, reserved: Reserved) -> str | None:
    """Why ``ref`` may not be a peer's credential (pure but for resolving a file's symlinks):
    it points at one of the broker's own secrets, which the peer would be sent as its bearer
    token. None when it is fine."""
    if not ref:
        return None
    kind, _, name = ref.partition(":")
    if kind == "env" and (name in reserved.env or name.upper().startswith("BROKER_")):
        return (
            f"the variable {name} holds the broker's own configuration or secrets, which a peer "
            "would be sent as its token: put the peer's token in a variable of its own"
        )
    if kind == "file":
        target = Path(name).resolve()
        for path in reserved.paths:
            place = path.resolve()
            if target == place or target.is_relative_to(place):
                return (
                    f"the file {name} is the broker's own ({place}), which a peer would be sent "
                    "as its token: put the peer's token in a file of its own"
                )
    return None


def describe_ref(ref: str | None) -> str:
    """How ``domain show`` names a reference: the option that sets it."""
    if not ref:
        return "-"
    kind, _, name = ref.partition(":")
    return {"env": f"--token-env {name}", "file": f"--token-file {name}"}.get(kind, ref)


def forget_files() -> None:
    """Read every token file again at its next use (``broker serve`` on SIGHUP)."""
    _files.clear()


def read_credential(ref: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token ``ref`` points at (None when there is no reference)."""
    if not ref:
        return None
    kind, _, name = ref.partition(":")
    if kind == "env":
        value = (os.environ if environ is None else environ).get(name)
        if not value:
            raise CredentialProblem(
                f"the peer's token variable {name} is not set in the broker's environment; "
                "export it and restart, or use --token-file PATH (read again when it changes): "
                "`broker domain update DOMAIN --token-file PATH`"
            )
        return value
    if kind == "file" and name:
        return _read_file(name)
    raise CredentialProblem(
        f"credential reference {ref!r} is neither env:VAR nor file:PATH; fix it with "
        "`broker domain update DOMAIN --token-env VAR` or `--token-file PATH`",
        permanent=True,
    )


def _read_file(path: str) -> str:
    """The first line of the token file, read again when its modification time or size
    changed since it was last read. Only a regular file is read (a pipe or a device could
    block the broker or never end), and at most :data:`MAX_TOKEN_BYTES` of it."""
    try:
        stat = os.stat(path)
        known = _files.get(path)
        if known is not None and (known.mtime_ns, known.size) == (stat.st_mtime_ns, stat.st_size):
            return known.value
        if not stat_mode.S_ISREG(stat.st_mode):
            raise CredentialProblem(
                f"the peer's token file {path} is not a regular file (a directory, a pipe or a "
                "device): write the token in a file and point the domain at it: "
                "`broker domain update DOMAIN --token-file PATH`"
            )
        head = _head(path)
    except OSError as exc:
        raise CredentialProblem(
            f"the peer's token file {path} cannot be read ({exc.strerror}); make it readable "
            "by the broker's user, or point the domain at another: "
            "`broker domain update DOMAIN --token-file PATH`"
        ) from None
    line = head.split(b"\n", 1)[0]
    if len(line) > MAX_TOKEN_BYTES:
        raise CredentialProblem(
            f"the peer's token file {path} starts with a line too long for a token (over "
            f"{MAX_TOKEN_BYTES} bytes): write the token alone on its first line"
        )
    try:
        value = line.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CredentialProblem(
            f"the peer's token file {path} is not text (UTF-8): write the token in it as text"
        ) from None
    if not value:
        raise CredentialProblem(f"the peer's token file {path} is empty; write the token in it")
    _files[path] = _Read(stat.st_mtime_ns, stat.st_size, value)
    return value


def _head(path: str) -> bytes:
    """At most one byte more than a token's line can hold, opened without blocking and
    refused when what was opened is not a regular file (it changed since it was looked at)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        if not stat_mode.S_ISREG(os.fstat(fd).st_mode):
            raise CredentialProblem(
                f"the peer's token file {path} is not a regular file: write the token in a file"
            )
        return os.read(fd, MAX_TOKEN_BYTES + 2)
    finally:
        os.close(fd)
