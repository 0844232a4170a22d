"""Where a peer's outbound credential is kept, and reading it there.

A domain's ``credential_ref`` names the place, never the secret: ``env:VAR`` (an environment
variable of the broker's processes, read when used) or ``file:PATH`` (a file, read again
whenever it changes: its modification time and size are looked at before each use, and
:func:`forget_files` drops what was read, as ``broker serve`` does on SIGHUP). A token file
lets an operator change a peer's token without restarting anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CredentialProblem",
    "credential_ref",
    "describe_ref",
    "forget_files",
    "read_credential",
]


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
    changed since it was last read."""
    try:
        stat = os.stat(path)
        known = _files.get(path)
        if known is not None and (known.mtime_ns, known.size) == (stat.st_mtime_ns, stat.st_size):
            return known.value
        with open(path, encoding="utf-8") as file:
            value = file.readline().strip()
    except OSError as exc:
        raise CredentialProblem(
            f"the peer's token file {path} cannot be read ({exc.strerror}); make it readable "
            "by the broker's user, or point the domain at another: "
            "`broker domain update DOMAIN --token-file PATH`"
        ) from None
    if not value:
        raise CredentialProblem(f"the peer's token file {path} is empty; write the token in it")
    _files[path] = _Read(stat.st_mtime_ns, stat.st_size, value)
    return value
