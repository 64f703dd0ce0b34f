"""Use cases of the tenant service: onboarding, reading tenants, and the gateway's directory."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.tenant import SCHEMA, SERVICE
from services.tenant.adapters.tables import api_key_directory, api_keys, shards, tenant_shards, tenants, users
from services.tenant.domain import credentials, rules
from shared.context import current_call
from shared.db import UnitOfWork
from shared.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    invalid,
)
from shared.outbox import record_change


@dataclass(frozen=True, slots=True)
class NewTenant:
    name: str
    subdomain: str
    plan_type: str
    settings: dict[str, Any]
    admin_email: str
    admin_first_name: str
    admin_last_name: str
    admin_password: str
    request_id: str


@dataclass(frozen=True, slots=True)
class Onboarded:
    tenant: dict[str, Any]
    shard_id: str
    admin_user_id: str
    api_key_id: str
    api_key: str


@dataclass(frozen=True, slots=True)
class ResolvedCredential:
    tenant_id: str
    user_id: str
    api_key_id: str
    email: str
    scopes: list[str]


def _row(mapping: Mapping[str, Any] | Any) -> dict[str, Any]:
    return {key: (str(value) if isinstance(value, uuid.UUID) else value) for key, value in mapping.items()}


class TenantUseCases:
    def __init__(
        self, sessions: async_sessionmaker[AsyncSession], password_policy: rules.PasswordPolicy
    ) -> None:
        self._sessions = sessions
        self._password_policy = password_policy

    def _require_platform_admin(self) -> None:
        if not current_call().platform_admin:
            raise PermissionDenied("this call needs the platform admin credential")

    async def create_tenant(self, new: NewTenant) -> Onboarded:
        self._require_platform_admin()
        violations = rules.validate_tenant_fields(new.name, new.subdomain)
        if new.plan_type not in rules.PLAN_TYPES:
            violations.append(
                invalid("tenant.plan_type", "must be basic, professional or enterprise").violations[0]
            )
        violations += rules.validate_email(new.admin_email, "admin_email")
        violations += rules.validate_password(new.admin_password, "admin_password", self._password_policy)
        request_uuid: uuid.UUID | None = None
        if new.request_id:
            try:
                request_uuid = uuid.UUID(new.request_id)
            except ValueError:
                violations += invalid("request_id", "must be a UUID").violations
        if violations:
            raise InvalidArgument(violations)

        if request_uuid is not None:
            earlier = await self._created_by_request(request_uuid)
            if earlier is not None:
                return earlier

        password_hash = credentials.hash_password(new.admin_password)
        key = credentials.issue_api_key()
        try:
            async with UnitOfWork(self._sessions, tenant_id=None) as uow:
                if await uow.session.scalar(select(tenants.c.id).where(tenants.c.subdomain == new.subdomain)):
                    raise AlreadyExists(f"subdomain {new.subdomain!r} is taken", reason="SUBDOMAIN_TAKEN")
                shard_id = await self._assign_shard(uow.session)
                now = dt.datetime.now(dt.UTC)
                tenant_row = {
                    "id": uuid.uuid4(),
                    "name": new.name.strip(),
                    "subdomain": new.subdomain,
                    "plan_type": new.plan_type,
                    "status": "active",
                    "settings": new.settings,
                    "version": 1,
                    "create_request_id": request_uuid,
                    "created_at": now,
                    "updated_at": now,
                }
                await uow.session.execute(insert(tenants).values(tenant_row))
                tenant_id = str(tenant_row["id"])
                await uow.session.execute(
                    insert(tenant_shards).values(
                        tenant_id=tenant_row["id"], shard_id=shard_id, epoch=1, assigned_at=now
                    )
                )
                await uow.set_tenant(tenant_id)
                user_row = {
                    "id": uuid.uuid4(),
                    "tenant_id": tenant_row["id"],
                    "email": new.admin_email,
                    "first_name": new.admin_first_name,
                    "last_name": new.admin_last_name,
                    "role": "admin",
                    "is_active": True,
                    "password_hash": password_hash,
                    "failed_login_count": 0,
                    "version": 1,
                    "created_at": now,
                    "updated_at": now,
                }
                await uow.session.execute(insert(users).values(user_row))
                key_row = {
                    "id": uuid.uuid4(),
                    "tenant_id": tenant_row["id"],
                    "user_id": user_row["id"],
                    "name": "initial admin key",
                    "prefix": key.prefix,
                    "salt": key.salt,
                    "key_hash": key.key_hash,
                    "scopes": ["read", "write", "admin"],
                    "version": 1,
                    "created_at": now,
                }
                await uow.session.execute(insert(api_keys).values(key_row))
                await uow.session.execute(
                    insert(api_key_directory).values(prefix=key.prefix, tenant_id=tenant_row["id"])
                )
                public_tenant = {k: v for k, v in tenant_row.items() if k != "create_request_id"}
                for table, row in (("tenants", public_tenant), ("users", user_row), ("api_keys", key_row)):
                    await record_change(
                        uow.session,
                        schema=SCHEMA,
                        service=SERVICE,
                        table=table,
                        tenant_id=tenant_id,
                        record_id=str(row["id"]),
                        operation="INSERT",
                        old=None,
                        new=row,
                        version=1,
                    )
                await uow.commit()
        except IntegrityError as exc:
            # A concurrent retry with the same request id won the race: answer with its tenant.
            if request_uuid is not None and "create_request_id" in str(exc.orig):
                earlier = await self._created_by_request(request_uuid)
                if earlier is not None:
                    return earlier
            if "subdomain" in str(exc.orig):
                raise AlreadyExists(
                    f"subdomain {new.subdomain!r} is taken", reason="SUBDOMAIN_TAKEN"
                ) from exc
            raise
        return Onboarded(
            tenant=_row({**public_tenant, "shard_id": shard_id}),
            shard_id=str(shard_id),
            admin_user_id=str(user_row["id"]),
            api_key_id=str(key_row["id"]),
            api_key=key.plaintext,
        )

    async def _created_by_request(self, request_id: uuid.UUID) -> Onboarded | None:
        """The result of an earlier CreateTenant with this request id. The API key itself was
        shown once and is not kept, so a retry gets the ids but not the secret again."""
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            row = (
                (
                    await uow.session.execute(
                        select(tenants, tenant_shards.c.shard_id)
                        .join(tenant_shards, tenant_shards.c.tenant_id == tenants.c.id)
                        .where(tenants.c.create_request_id == request_id)
                    )
                )
                .mappings()
                .first()
            )
            if row is None:
                return None
            await uow.set_tenant(str(row["id"]))
            admin = (
                await uow.session.execute(
                    select(users.c.id)
                    .where(users.c.tenant_id == row["id"], users.c.role == "admin")
                    .order_by(users.c.created_at)
                )
            ).scalar()
            key_id = (
                await uow.session.execute(
                    select(api_keys.c.id)
                    .where(api_keys.c.tenant_id == row["id"])
                    .order_by(api_keys.c.created_at)
                )
            ).scalar()
        tenant = _row({k: v for k, v in row.items() if k != "create_request_id"})
        return Onboarded(
            tenant=tenant,
            shard_id=tenant["shard_id"],
            admin_user_id=str(admin),
            api_key_id=str(key_id),
            api_key="",
        )

    async def _assign_shard(self, session: AsyncSession) -> uuid.UUID:
        """The active shared shard with the fewest tenants that still has room."""
        counts = (
            select(tenant_shards.c.shard_id, func.count().label("tenant_count"))
            .group_by(tenant_shards.c.shard_id)
            .subquery()
        )
        load = func.coalesce(counts.c.tenant_count, 0)
        shard_id = await session.scalar(
            select(shards.c.id)
            .outerjoin(counts, counts.c.shard_id == shards.c.id)
            .where(shards.c.is_active, ~shards.c.is_dedicated, load < shards.c.max_tenants)
            .order_by(load, shards.c.name)
            .limit(1)
            .with_for_update(of=shards)
        )
        if shard_id is None:
            raise ResourceExhausted(
                "no active shard has room for another tenant; register a shard", reason="NO_SHARD_CAPACITY"
            )
        return uuid.UUID(str(shard_id))

    async def get_tenant(self, tenant_id: str) -> dict[str, Any]:
        call = current_call()
        if not call.platform_admin and call.tenant_id != tenant_id:
            # Never confirm that another tenant exists.
            raise NotFound(f"tenant {tenant_id} not found")
        try:
            tenant_uuid = uuid.UUID(tenant_id)
        except ValueError as exc:
            raise invalid("id", "must be a UUID") from exc
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            row = (
                (
                    await uow.session.execute(
                        select(tenants, tenant_shards.c.shard_id)
                        .join(tenant_shards, tenant_shards.c.tenant_id == tenants.c.id)
                        .where(tenants.c.id == tenant_uuid)
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"tenant {tenant_id} not found")
        return _row({k: v for k, v in row.items() if k != "create_request_id"})

    # --- the gateway's directory -------------------------------------------------------------

    async def resolve_credential(self, credential: str) -> ResolvedCredential:
        parsed = credentials.parse_api_key(credential)
        if parsed is None:
            raise Unauthenticated("unrecognised credential")
        prefix, secret = parsed
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            tenant_id = await uow.session.scalar(
                select(api_key_directory.c.tenant_id).where(api_key_directory.c.prefix == prefix)
            )
            if tenant_id is None:
                raise Unauthenticated("unknown or revoked API key")
            await uow.set_tenant(str(tenant_id))
            row = (
                (
                    await uow.session.execute(
                        select(api_keys, users.c.email, users.c.is_active)
                        .join(
                            users,
                            (users.c.id == api_keys.c.user_id) & (users.c.tenant_id == api_keys.c.tenant_id),
                        )
                        .where(api_keys.c.prefix == prefix)
                    )
                )
                .mappings()
                .first()
            )
        if (
            row is None
            or row["revoked_at"] is not None
            or not row["is_active"]
            or not credentials.api_key_matches(secret, row["salt"], row["key_hash"])
        ):
            raise Unauthenticated("unknown or revoked API key")
        return ResolvedCredential(
            tenant_id=str(row["tenant_id"]),
            user_id=str(row["user_id"]),
            api_key_id=str(row["id"]),
            email=row["email"],
            scopes=list(row["scopes"]),
        )

    async def tenant_route(self, tenant_id: str) -> dict[str, Any]:
        try:
            tenant_uuid = uuid.UUID(tenant_id)
        except ValueError as exc:
            raise invalid("tenant_id", "must be a UUID") from exc
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            row = (
                (
                    await uow.session.execute(
                        select(
                            tenants.c.id,
                            tenants.c.status,
                            tenants.c.plan_type,
                            tenant_shards.c.shard_id,
                            tenant_shards.c.epoch,
                        )
                        .join(tenant_shards, tenant_shards.c.tenant_id == tenants.c.id)
                        .where(tenants.c.id == tenant_uuid)
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"tenant {tenant_id} not found")
        return _row(row)

    async def shard_routes(self) -> list[dict[str, Any]]:
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            rows = (await uow.session.execute(select(shards).order_by(shards.c.name))).mappings().all()
        return [_row(row) for row in rows]

    async def register_shards(self, specs: list[dict[str, Any]]) -> None:
        """Registers the shards named in settings that the directory does not know yet."""
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            for spec in specs:
                exists = await uow.session.scalar(select(shards.c.id).where(shards.c.name == spec["name"]))
                if exists is None:
                    await uow.session.execute(
                        insert(shards).values(
                            id=uuid.uuid4(),
                            name=spec["name"],
                            core_entity_address=spec["core_entity_address"],
                            custom_object_address=spec["custom_object_address"],
                            max_tenants=int(spec.get("max_tenants", 1000)),
                            is_active=True,
                            is_dedicated=bool(spec.get("dedicated", False)),
                            created_at=dt.datetime.now(dt.UTC),
                        )
                    )
            await uow.commit()
