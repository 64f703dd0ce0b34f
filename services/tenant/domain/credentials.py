"""API keys and password hashes.

API keys are 256-bit random secrets, so a salted SHA-256 is enough and keeps the gateway's
cache misses cheap; passwords are low-entropy and get argon2id. Both compare in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

API_KEY_SCHEME = "crm"
_password_hasher = PasswordHasher()


@dataclass(frozen=True, slots=True)
class IssuedApiKey:
    plaintext: str
    prefix: str
    salt: str
    key_hash: str


def issue_api_key() -> IssuedApiKey:
    prefix = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    return IssuedApiKey(f"{API_KEY_SCHEME}_{prefix}_{secret}", prefix, salt, _hash_secret(salt, secret))


def parse_api_key(credential: str) -> tuple[str, str] | None:
    """Splits `crm_<prefix>_<secret>` into prefix and secret, or None when it is not one."""
    scheme, _, rest = credential.partition("_")
    prefix, _, secret = rest.partition("_")
    if scheme != API_KEY_SCHEME or len(prefix) != 12 or not secret:
        return None
    return prefix, secret


def api_key_matches(secret: str, salt: str, key_hash: str) -> bool:
    return hmac.compare_digest(_hash_secret(salt, secret), key_hash)


def _hash_secret(salt: str, secret: str) -> str:
    return hashlib.sha256(f"{salt}:{secret}".encode()).hexdigest()


def hash_password(password: str) -> str:
    return _password_hasher.hash(password)


def password_matches(password_hash: str, password: str) -> bool:
    try:
        return _password_hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


SESSION_SCHEME = "crms"


@dataclass(frozen=True, slots=True)
class IssuedSession:
    plaintext: str
    prefix: str
    salt: str
    token_hash: str


def issue_session_token() -> IssuedSession:
    """A session bearer `crms_<16 hex prefix>_<secret>`. The prefix is longer than an API key's
    (12), so both kinds share one credential directory without colliding."""
    prefix = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    return IssuedSession(f"{SESSION_SCHEME}_{prefix}_{secret}", prefix, salt, _hash_secret(salt, secret))


def parse_session_token(credential: str) -> tuple[str, str] | None:
    scheme, _, rest = credential.partition("_")
    prefix, _, secret = rest.partition("_")
    if scheme != SESSION_SCHEME or len(prefix) != 16 or not secret:
        return None
    return prefix, secret


def token_matches(secret: str, salt: str, token_hash: str) -> bool:
    return hmac.compare_digest(_hash_secret(salt, secret), token_hash)
