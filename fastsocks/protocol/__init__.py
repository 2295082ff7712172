"""Sans-I/O protocol parsers and serializers: bytes in, events out, bytes to send.

``socks5`` (RFC 1928) is re-exported here; ``socks4`` (SOCKS4 and SOCKS4a) is used as
``fastsocks.protocol.socks4``: the two share a port and are told apart by the first byte.
"""

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
