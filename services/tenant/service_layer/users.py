"""Use cases for a tenant's people and credentials: users, sign-in with lockout, sessions, API
keys. Every call runs in the calling tenant's unit of work; the tenant comes from the caller's
credential, never from the request."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm.v1 import events_pb2
from services.tenant import SCHEMA, SERVICE
from services.tenant.adapters.tables import (
    api_key_directory,
    api_keys,
    sessions,
    system_metadata,
    tenants,
    users,
)
from services.tenant.domain import credentials, rules
from services.tenant.service_layer.common import (
    caller_tenant,
    check_etag,
    check_mask,
    now,
    parse_uuid,
    publish_auth_event,
    publish_control,
    require_tenant_admin,
    row_dict,
    violations_or_none,
)
from shared import paging
from shared.context import current_call
from shared.db import UnitOfWork
from shared.errors import AlreadyExists, FailedPrecondition, NotFound, Unauthenticated, invalid
from shared.outbox import record_change

USER_PUBLIC = [c for c in users.c if c.name != "password_hash"]
KEY_PUBLIC = [c for c in api_keys.c if c.name not in ("salt", "key_hash")]
# Sign-in answers the same for an unknown tenant, user or wrong password: no account probing.
BAD_SIGN_IN = "invalid subdomain, e-mail or password"


@dataclass(frozen=True, slots=True)
class AuthSettings:
    session_ttl: dt.timedelta
    lockout_threshold: int
    lockout: dt.timedelta


@dataclass(frozen=True, slots=True)
class SignedIn:
    token: str
    session_id: str
    expires_at: dt.datetime
    user: dict[str, Any]
    tenant_id: str


@dataclass(frozen=True, slots=True)
class IssuedKey:
    api_key: dict[str, Any]
    plaintext: str


async def password_policy(session: AsyncSession) -> rules.PasswordPolicy:
    """The tenant's own password policy if it has one, else the global one (system metadata)."""
    rows = (
        await session.execute(
            select(system_metadata.c.tenant_id, system_metadata.c.metadata_value).where(
                system_metadata.c.metadata_type == "system_config",
                system_metadata.c.metadata_key == "password_policy",
            )
        )
    ).all()
    chosen = next((r for r in rows if r[0] is not None), None) or next(iter(rows), None)
    return rules.password_policy_from(chosen[1] if chosen is not None else None)


class UserUseCases:
    def __init__(self, sessions_: async_sessionmaker[AsyncSession], auth: AuthSettings) -> None:
        self._sessions = sessions_
        self._auth = auth

    # --- users ---------------------------------------------------------------------------------

    async def create_user(
        self, email: str, first_name: str, last_name: str, role: str, password: str
    ) -> dict[str, Any]:
        tenant_id = caller_tenant()
        violations = rules.validate_user_fields(email, first_name, last_name, role)
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            await require_tenant_admin(uow.session)
            violations += rules.validate_password(password, "password", await password_policy(uow.session))
            violations_or_none(violations)
            if await uow.session.scalar(
                select(users.c.id).where(
                    users.c.tenant_id == uuid.UUID(tenant_id), func.lower(users.c.email) == email.lower()
                )
            ):
                raise AlreadyExists(f"a user with e-mail {email!r} exists", reason="EMAIL_TAKEN")
            password_hash = await asyncio.to_thread(credentials.hash_password, password)
            stamp = now()
            row = {
                "id": uuid.uuid4(),
                "tenant_id": uuid.UUID(tenant_id),
                "email": email,
                "first_name": first_name,
                "last_name": last_name,
                "role": role,
                "is_active": True,
                "password_hash": password_hash,
                "failed_login_count": 0,
                "version": 1,
                "created_at": stamp,
                "updated_at": stamp,
            }
            try:
                await uow.session.execute(insert(users).values(row))
            except IntegrityError as exc:
                raise AlreadyExists(f"a user with e-mail {email!r} exists", reason="EMAIL_TAKEN") from exc
            await record_change(
                uow.session,
                schema=SCHEMA,
                service=SERVICE,
                table="users",
                tenant_id=tenant_id,
                record_id=str(row["id"]),
                operation="INSERT",
                old=None,
                new=row,
                version=1,
            )
            await uow.commit()
        return row_dict({k: v for k, v in row.items() if k != "password_hash"})

    async def list_users(self, page_size: int, page_token: str) -> tuple[list[dict[str, Any]], str, int]:
        tenant_id = caller_tenant()
        size = paging.page_size(page_size)
        fingerprint = paging.query_fingerprint("users", tenant_id)
        cursor = paging.decode_token(page_token, fingerprint)
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            query = select(*USER_PUBLIC).where(users.c.tenant_id == uuid.UUID(tenant_id))
            total = await uow.session.scalar(
                select(func.count()).select_from(users).where(users.c.tenant_id == uuid.UUID(tenant_id))
            )
            if cursor is not None:
                query = query.where(
                    tuple_(func.lower(users.c.email), users.c.id) > tuple_(cursor[0], uuid.UUID(cursor[1]))
                )
            rows = (
                (
                    await uow.session.execute(
                        query.order_by(func.lower(users.c.email), users.c.id).limit(size + 1)
                    )
                )
                .mappings()
                .all()
            )
        page = [row_dict(r) for r in rows[:size]]
        token = (
            paging.encode_token([page[-1]["email"].lower(), page[-1]["id"]], fingerprint)
            if len(rows) > size
            else ""
        )
        return page, token, int(total or 0)

    async def update_user(
        self, user_id: str, etag: str, paths: list[str], changes: dict[str, Any], password: str
    ) -> dict[str, Any]:
        tenant_id = caller_tenant()
        user_uuid = parse_uuid(user_id, "user.id")
        check_mask(paths, ("first_name", "last_name", "role", "active", "password"))
        violations = []
        if "role" in paths and changes["role"] not in rules.USER_ROLES:
            violations += invalid("user.role", "must be admin, member or read_only").violations
        for name in ("first_name", "last_name"):
            if name in paths and len(changes[name]) > 100:
                violations += invalid(f"user.{name}", "must be at most 100 characters").violations
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            # A user may change their own names and password; anything else needs an admin.
            if not (
                str(user_uuid) == current_call().user_id
                and set(paths) <= {"first_name", "last_name", "password"}
            ):
                await require_tenant_admin(uow.session)
            if "password" in paths:
                violations += rules.validate_password(
                    password, "password", await password_policy(uow.session)
                )
            violations_or_none(violations)
            old = (
                (
                    await uow.session.execute(
                        select(users)
                        .where(users.c.id == user_uuid, users.c.tenant_id == uuid.UUID(tenant_id))
                        .with_for_update()
                    )
                )
                .mappings()
                .first()
            )
            if old is None:
                raise NotFound(f"user {user_id} not found")
            check_etag(etag, old["version"], "user")
            values: dict[str, Any] = {}
            for path in paths:
                if path == "active":
                    values["is_active"] = bool(changes["active"])
                elif path == "password":
                    values["password_hash"] = await asyncio.to_thread(credentials.hash_password, password)
                    # A changed password ends the lockout and the user's other sessions.
                    values["failed_login_count"] = 0
                    values["locked_until"] = None
                else:
                    values[path] = changes[path]
            values["version"] = old["version"] + 1
            values["updated_at"] = now()
            await uow.session.execute(update(users).where(users.c.id == user_uuid).values(values))
            new = {**dict(old), **values}
            if "password" in paths or values.get("is_active") is False:
                await uow.session.execute(
                    update(sessions)
                    .where(sessions.c.user_id == user_uuid, sessions.c.revoked_at.is_(None))
                    .values(revoked_at=now())
                )
            if "password" in paths:
                await publish_auth_event(
                    uow.session,
                    event_type="password_change",
                    tenant_id=tenant_id,
                    user_id=str(user_uuid),
                    email=old["email"],
                    success=True,
                )
            await record_change(
                uow.session,
                schema=SCHEMA,
                service=SERVICE,
                table="users",
                tenant_id=tenant_id,
                record_id=str(user_uuid),
                operation="UPDATE",
                old=dict(old),
                new=new,
                version=new["version"],
            )
            await uow.commit()
        return row_dict({k: v for k, v in new.items() if k != "password_hash"})

    # --- sign-in -------------------------------------------------------------------------------

    async def authenticate(self, subdomain: str, email: str, password: str) -> SignedIn:
        violations = []
        if not subdomain:
            violations += invalid("subdomain", "is required").violations
        if not email:
            violations += invalid("email", "is required").violations
        if not password:
            violations += invalid("password", "is required").violations
        violations_or_none(violations)
        call = current_call()
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            tenant = (
                await uow.session.execute(
                    select(tenants.c.id, tenants.c.status).where(tenants.c.subdomain == subdomain)
                )
            ).first()
            # An app signs in its own tenant's users only: a key of tenant A cannot probe B.
            if (
                tenant is None
                or tenant[1] != "active"
                or (call.tenant_id and call.tenant_id != str(tenant[0]))
            ):
                await publish_auth_event(
                    uow.session, event_type="login_failure", email=email, failure_reason="unknown tenant"
                )
                await uow.commit()
                raise Unauthenticated(BAD_SIGN_IN, reason="BAD_CREDENTIALS")
        tenant_id = str(tenant[0])
        failure: Unauthenticated | None = None
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            user = (
                (
                    await uow.session.execute(
                        select(users)
                        .where(users.c.tenant_id == tenant[0], func.lower(users.c.email) == email.lower())
                        .with_for_update()
                    )
                )
                .mappings()
                .first()
            )
            stamp = now()

            async def fail(reason: str, user_id: str = "") -> Unauthenticated:
                await publish_auth_event(
                    uow.session,
                    event_type="login_failure",
                    tenant_id=tenant_id,
                    user_id=user_id,
                    email=email,
                    failure_reason=reason,
                )
                return Unauthenticated(BAD_SIGN_IN, reason="BAD_CREDENTIALS")

            if user is None:
                # Still spend a hash's time, so response times do not reveal which e-mails exist.
                await asyncio.to_thread(credentials.password_matches, _DUMMY_HASH, password)
                failure = await fail("unknown user")
            elif user["locked_until"] is not None and user["locked_until"] > stamp:
                failure = await fail("account locked", str(user["id"]))
                failure = Unauthenticated(
                    "the account is locked after repeated failed sign-ins; try again later",
                    reason="ACCOUNT_LOCKED",
                )
            elif not user["is_active"]:
                failure = await fail("user inactive", str(user["id"]))
            elif not await asyncio.to_thread(credentials.password_matches, user["password_hash"], password):
                outcome = rules.after_failed_sign_in(user["failed_login_count"], self._auth.lockout_threshold)
                await uow.session.execute(
                    update(users)
                    .where(users.c.id == user["id"])
                    .values(
                        failed_login_count=outcome.failed_count,
                        locked_until=stamp + self._auth.lockout if outcome.lock else user["locked_until"],
                    )
                )
                failure = await fail("wrong password", str(user["id"]))
                if outcome.lock:
                    await publish_auth_event(
                        uow.session,
                        event_type="account_locked",
                        tenant_id=tenant_id,
                        user_id=str(user["id"]),
                        email=email,
                        failure_reason=f"{self._auth.lockout_threshold} failed sign-ins in a row",
                    )
            if failure is not None:
                # The failure count and the events must stick even though the call fails.
                await uow.commit()
                raise failure
            assert user is not None
            issued = credentials.issue_session_token()
            session_id = uuid.uuid4()
            expires_at = stamp + self._auth.session_ttl
            await uow.session.execute(
                insert(sessions).values(
                    id=session_id,
                    tenant_id=tenant[0],
                    user_id=user["id"],
                    prefix=issued.prefix,
                    salt=issued.salt,
                    token_hash=issued.token_hash,
                    ip_address=call.ip_address,
                    user_agent=call.user_agent,
                    expires_at=expires_at,
                    created_at=stamp,
                )
            )
            await uow.session.execute(
                insert(api_key_directory).values(prefix=issued.prefix, tenant_id=tenant[0])
            )
            await uow.session.execute(
                update(users)
                .where(users.c.id == user["id"])
                .values(failed_login_count=0, locked_until=None, last_login_at=stamp)
            )
            await publish_auth_event(
                uow.session,
                event_type="login_success",
                tenant_id=tenant_id,
                user_id=str(user["id"]),
                email=email,
                success=True,
                session_id=str(session_id),
            )
            await uow.commit()
        public = {k: v for k, v in user.items() if k != "password_hash"}
        public.update(failed_login_count=0, locked_until=None, last_login_at=stamp)
        return SignedIn(issued.plaintext, str(session_id), expires_at, row_dict(public), tenant_id)

    async def logout(self) -> str:
        tenant_id = caller_tenant()
        call = current_call()
        if not call.session_id:
            raise FailedPrecondition(
                "logout ends a session; this call was made with an API key", reason="NOT_A_SESSION"
            )
        session_uuid = parse_uuid(call.session_id, "session_id")
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            await uow.session.execute(
                update(sessions)
                .where(sessions.c.id == session_uuid, sessions.c.revoked_at.is_(None))
                .values(revoked_at=now())
            )
            await publish_auth_event(
                uow.session,
                event_type="logout",
                tenant_id=tenant_id,
                user_id=call.user_id or "",
                email=call.email or "",
                success=True,
                session_id=str(session_uuid),
            )
            await uow.commit()
        return str(session_uuid)

    # --- API keys ------------------------------------------------------------------------------

    async def create_api_key(self, name: str, scopes: list[str]) -> IssuedKey:
        tenant_id = caller_tenant()
        scopes = list(dict.fromkeys(scopes or ["read", "write"]))
        violations = rules.validate_scopes(scopes, "api_key.scopes")
        if not name.strip():
            violations += invalid("api_key.name", "must not be blank").violations
        elif len(name) > 100:
            violations += invalid("api_key.name", "must be at most 100 characters").violations
        violations_or_none(violations)
        key = credentials.issue_api_key()
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            await require_tenant_admin(uow.session)
            stamp = now()
            row = {
                "id": uuid.uuid4(),
                "tenant_id": uuid.UUID(tenant_id),
                "user_id": uuid.UUID(current_call().user_id or ""),
                "name": name.strip(),
                "prefix": key.prefix,
                "salt": key.salt,
                "key_hash": key.key_hash,
                "scopes": scopes,
                "version": 1,
                "created_at": stamp,
            }
            await uow.session.execute(insert(api_keys).values(row))
            await uow.session.execute(
                insert(api_key_directory).values(prefix=key.prefix, tenant_id=row["tenant_id"])
            )
            await record_change(
                uow.session,
                schema=SCHEMA,
                service=SERVICE,
                table="api_keys",
                tenant_id=tenant_id,
                record_id=str(row["id"]),
                operation="INSERT",
                old=None,
                new=row,
                version=1,
            )
            await uow.commit()
        public = row_dict({k: v for k, v in row.items() if k not in ("salt", "key_hash")})
        return IssuedKey(public, key.plaintext)

    async def list_api_keys(self, page_size: int, page_token: str) -> tuple[list[dict[str, Any]], str, int]:
        tenant_id = caller_tenant()
        size = paging.page_size(page_size)
        fingerprint = paging.query_fingerprint("api_keys", tenant_id)
        cursor = paging.decode_token(page_token, fingerprint)
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            where = api_keys.c.tenant_id == uuid.UUID(tenant_id)
            total = await uow.session.scalar(select(func.count()).select_from(api_keys).where(where))
            query = select(*KEY_PUBLIC).where(where)
            if cursor is not None:
                query = query.where(
                    tuple_(api_keys.c.created_at, api_keys.c.id)
                    < tuple_(dt.datetime.fromisoformat(cursor[0]), uuid.UUID(cursor[1]))
                )
            rows = (
                (
                    await uow.session.execute(
                        query.order_by(api_keys.c.created_at.desc(), api_keys.c.id.desc()).limit(size + 1)
                    )
                )
                .mappings()
                .all()
            )
        page = [row_dict(r) for r in rows[:size]]
        token = (
            paging.encode_token([page[-1]["created_at"].isoformat(), page[-1]["id"]], fingerprint)
            if len(rows) > size
            else ""
        )
        return page, token, int(total or 0)

    async def revoke_api_key(self, key_id: str) -> dict[str, Any]:
        tenant_id = caller_tenant()
        key_uuid = parse_uuid(key_id, "id")
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            await require_tenant_admin(uow.session)
            old = (
                (
                    await uow.session.execute(
                        select(*KEY_PUBLIC)
                        .where(api_keys.c.id == key_uuid, api_keys.c.tenant_id == uuid.UUID(tenant_id))
                        .with_for_update()
                    )
                )
                .mappings()
                .first()
            )
            if old is None:
                raise NotFound(f"API key {key_id} not found")
            if old["revoked_at"] is not None:
                return row_dict(old)  # revoking twice is harmless
            new = {**dict(old), "revoked_at": now(), "version": old["version"] + 1}
            await uow.session.execute(
                update(api_keys)
                .where(api_keys.c.id == key_uuid)
                .values(revoked_at=new["revoked_at"], version=new["version"])
            )
            await record_change(
                uow.session,
                schema=SCHEMA,
                service=SERVICE,
                table="api_keys",
                tenant_id=tenant_id,
                record_id=key_id,
                operation="UPDATE",
                old=dict(old),
                new=new,
                version=new["version"],
            )
            # The gateway drops the cached credential at once on this event.
            await publish_control(
                uow.session, events_pb2.CONTROL_EVENT_KIND_API_KEY_REVOKED, tenant_id, resource_id=key_id
            )
            await uow.commit()
        return row_dict(new)


_DUMMY_HASH = credentials.hash_password("not-a-real-password-0")
