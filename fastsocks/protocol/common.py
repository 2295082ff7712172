"""What every parser here shares."""

from __future__ import annotations

from typing import Final


class _NeedData:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()
"""Returned by ``next_event()`` (and the sub-negotiation parsers) when no event can be
produced yet."""
