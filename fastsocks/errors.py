"""Every exception fastsocks defines, in one tree.

Auth failures and policy denials are outcomes, not exceptions; OS errors stay
the builtin OSError subclasses.
"""

from __future__ import annotations


class FastSocksError(Exception):
    """Base of every fastsocks exception."""


class ConfigError(FastSocksError):
    """A setting is invalid; prints like ``fastsocks.toml:12: rules[2].port: expected 1-65535``."""

    def __init__(self, path: str | None, line: int | None, field: str, msg: str) -> None:
        self.path, self.line, self.field, self.msg = path, line, field, msg
        where = path or "command line"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {field}: {msg}")


class ProtocolError(FastSocksError):
    """The peer broke the protocol.

    ``reply`` is the reply code to send before closing, or None when the
    protocol has no way to answer at this point (e.g. an unknown version byte).
    """

    def __init__(self, msg: str, reply: int | None = None) -> None:
        super().__init__(msg)
        self.reply = reply


class LocalProtocolError(ProtocolError):
    """We tried to send something the protocol does not allow in this state."""


class BootError(FastSocksError):
    """A worker could not start; the master stops instead of respawning it."""
