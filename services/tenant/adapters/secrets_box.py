"""Encryption at rest for configuration values marked is_encrypted and for shard connection
settings, with cryptography's Fernet (AES-128-CBC + HMAC-SHA256, authenticated)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from cryptography.fernet import Fernet, InvalidToken


class SecretBox:
    def __init__(self, key: str, fallback_secret: str = "") -> None:
        if not key:
            # Local stacks only: a key derived from the internal token keeps values readable
            # across restarts without another variable to manage.
            digest = hashlib.sha256(f"crm-config-encryption:{fallback_secret}".encode()).digest()
            key = base64.urlsafe_b64encode(digest).decode()
        self._fernet = Fernet(key.encode())

    def encrypt_text(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def decrypt_text(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken as exc:
            raise RuntimeError("a stored value cannot be decrypted with the configured key") from exc

    def encrypt_json(self, value: Any) -> str:
        return self.encrypt_text(json.dumps(value, sort_keys=True))

    def decrypt_json(self, token: str) -> Any:
        return json.loads(self.decrypt_text(token))
