"""fastsocks: a prefork SOCKS5 proxy server with a Cython relay engine."""

__version__ = "0.1.0"
