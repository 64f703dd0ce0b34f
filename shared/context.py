"""The caller's identity for the current call, set once by the server interceptor from the
gateway's metadata and read by handlers and the outbox (actor, request id)."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field

# Metadata keys the gateway sets; backends trust them only with a valid internal credential.
TENANT_ID_KEY = "x-crm-tenant-id"
USER_ID_KEY = "x-crm-user-id"
REQUEST_ID_KEY = "x-crm-request-id"
SHARD_EPOCH_KEY = "x-crm-shard-epoch"
API_KEY_ID_KEY = "x-crm-api-key-id"
SESSION_ID_KEY = "x-crm-session-id"
USER_EMAIL_KEY = "x-crm-user-email"
CLIENT_IP_KEY = "x-crm-client-ip"
USER_AGENT_KEY = "x-crm-user-agent"
PLATFORM_ADMIN_KEY = "x-crm-platform-admin"
INTERNAL_TOKEN_KEY = "x-crm-internal-token"
CLIENT_REQUEST_ID_KEY = "x-request-id"


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who is calling and on whose behalf, for one call."""

    request_id: str
    method: str = ""
    tenant_id: str | None = None
    user_id: str | None = None
    api_key_id: str | None = None
    session_id: str | None = None
    email: str | None = None
    ip_address: str | None = None
    user_agent: str | None = None
    shard_epoch: int | None = None
    platform_admin: bool = False
    extra: dict[str, str] = field(default_factory=dict)


_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "crm_call_context", default=None
)


def current_call() -> CallContext:
    """The current call's context; a background task without one gets a system context."""
    ctx = _current.get()
    return ctx if ctx is not None else CallContext(request_id="", method="system")


def set_call(ctx: CallContext) -> contextvars.Token[CallContext | None]:
    return _current.set(ctx)


def reset_call(token: contextvars.Token[CallContext | None]) -> None:
    _current.reset(token)
