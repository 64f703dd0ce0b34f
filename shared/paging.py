"""Opaque, keyset page tokens (AIP-158) shared by every List method.

A token carries the last row's sort key and a hash of the query it belongs to; reusing it with
another filter or order is INVALID_ARGUMENT instead of a silently wrong page.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from shared.errors import invalid

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def page_size(requested: int) -> int:
    if requested < 0:
        raise invalid("page_size", "must not be negative")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def query_fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_token(cursor: list[Any], fingerprint: str) -> str:
    raw = json.dumps({"c": cursor, "q": fingerprint}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, fingerprint: str) -> list[Any] | None:
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode()))
        cursor, owner = data["c"], data["q"]
    except (ValueError, KeyError, TypeError) as exc:
        raise invalid("page_token", "is not a token this method issued") from exc
    if owner != fingerprint or not isinstance(cursor, list):
        raise invalid("page_token", "belongs to a different filter or order; start again without it")
    return cursor
