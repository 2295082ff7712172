"""Sans-I/O protocol parsers and serializers: bytes in, events out, bytes to send."""

from fastsocks.protocol.socks5 import (
    MAX_GREETING_BYTES,
    MAX_REQUEST_BYTES,
    NEED_DATA,
    SOCKS_VERSION,
    AddressType,
    Command,
    CommandReply,
    Greeting,
    Method,
    MethodSelection,
    Reply,
    Request,
    ServerConnection,
    State,
)

__all__ = [
    "MAX_GREETING_BYTES",
    "MAX_REQUEST_BYTES",
    "NEED_DATA",
    "SOCKS_VERSION",
    "AddressType",
    "Command",
    "CommandReply",
    "Greeting",
    "Method",
    "MethodSelection",
    "Reply",
    "Request",
    "ServerConnection",
    "State",
]
