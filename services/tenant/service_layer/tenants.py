"""Use cases of the tenant service: onboarding, reading tenants, and the gateway's directory."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm.v1 import events_pb2
from services.tenant import SCHEMA, SERVICE
from services.tenant.adapters import shard_db
from services.tenant.adapters.pipeline import PipelineProvisioner, PipelineTarget, pipeline_request_id
from services.tenant.adapters.tables import (
    api_key_directory,
    api_keys,
    sessions,
    shards,
    tenant_configurations,
    tenant_moves,
    tenant_shards,
    tenants,
    users,
)
from services.tenant.domain import credentials, rules
from services.tenant.service_layer.common import check_etag, check_mask, parse_uuid, publish_control
from services.tenant.service_layer.configuration import default_configuration_rows, set_directory_scope
from services.tenant.service_layer.shards import ShardUseCases
from services.tenant.service_layer.users import password_policy
from shared import paging
from shared.context import current_call
from shared.db import UnitOfWork
from shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    invalid,
)
from shared.logging import get_logger
from shared.outbox import record_change

log = get_logger(__name__)
TENANT_PUBLIC = [c for c in tenants.c if c.name != "create_request_id"]


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
    default_pipeline_id: str = ""


@dataclass(frozen=True, slots=True)
class ResolvedCredential:
    tenant_id: str
    user_id: str
    api_key_id: str
    email: str
    scopes: list[str]
    session_id: str = ""
    cache_seconds: int = 5


def _row(mapping: Mapping[str, Any] | Any) -> dict[str, Any]:
    return {key: (str(value) if isinstance(value, uuid.UUID) else value) for key, value in mapping.items()}


class TenantUseCases:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        shard_cases: ShardUseCases,
        pipelines: PipelineProvisioner,
        credential_cache_seconds: int = 5,
    ) -> None:
        self._sessions = sessions
        self._shards = shard_cases
        self._pipelines = pipelines
        self._credential_cache_seconds = credential_cache_seconds

    def _require_platform_admin(self) -> None:
        if not current_call().platform_admin:
            raise PermissionDenied("this call needs the platform admin credential")

    async def create_tenant(self, new: NewTenant, dedicated: bool = False) -> Onboarded:
        """Onboards in three steps that look like one to the caller: (1) the directory rows in
        the 'provisioning' state, invisible to routing and sign-in; (2) the tenant's membership
        and default pipeline on its shard; (3) the flip to 'active' with every change event.
        A failure in (2) removes the rows of (1); a crash leaves them 'provisioning', and a retry
        with the same request id resumes from (2) instead of making a second tenant."""
        self._require_platform_admin()
        violations = rules.validate_tenant_fields(new.name, new.subdomain)
        if new.plan_type not in rules.PLAN_TYPES:
            violations.append(
                invalid("tenant.plan_type", "must be basic, professional or enterprise").violations[0]
            )
        elif dedicated and new.plan_type != "enterprise":
            violations += invalid(
                "dedicated_shard", "only the enterprise plan may ask for a dedicated shard"
            ).violations
        violations += rules.validate_email(new.admin_email, "admin_email")
        request_uuid: uuid.UUID | None = None
        if new.request_id:
            try:
                request_uuid = uuid.UUID(new.request_id)
            except ValueError:
                violations += invalid("request_id", "must be a UUID").violations
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            policy = await password_policy(uow.session)
        violations += rules.validate_password(new.admin_password, "admin_password", policy)
        if violations:
            raise InvalidArgument(violations)

        if request_uuid is not None:
            earlier = await self._created_by_request(request_uuid)
            if earlier is not None:
                if earlier.tenant["status"] != "provisioning":
                    return earlier
                return await self._finish_onboarding(
                    uuid.UUID(earlier.tenant["id"]), request_uuid, resumed=True
                )

        password_hash = await asyncio.to_thread(credentials.hash_password, new.admin_password)
        key = credentials.issue_api_key()
        try:
            async with UnitOfWork(self._sessions, tenant_id=None) as uow:
                if await uow.session.scalar(select(tenants.c.id).where(tenants.c.subdomain == new.subdomain)):
                    raise AlreadyExists(f"subdomain {new.subdomain!r} is taken", reason="SUBDOMAIN_TAKEN")
                shard_id = await self._assign_shard(uow.session, dedicated)
                now = dt.datetime.now(dt.UTC)
                tenant_uuid = uuid.uuid4()
                tenant_row: dict[str, Any] = {
                    "id": tenant_uuid,
                    "name": new.name.strip(),
                    "subdomain": new.subdomain,
                    "plan_type": new.plan_type,
                    "status": "provisioning",
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
                admin_uuid = uuid.uuid4()
                user_row = {
                    "id": admin_uuid,
                    "tenant_id": tenant_uuid,
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
                await self._insert_key(uow.session, tenant_uuid, admin_uuid, key)
                await uow.session.execute(
                    insert(tenant_configurations).values(default_configuration_rows(tenant_uuid))
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
        return await self._finish_onboarding(tenant_uuid, request_uuid, resumed=False, key=key)

    async def _insert_key(
        self, session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, key: credentials.IssuedApiKey
    ) -> None:
        await session.execute(
            insert(api_keys).values(
                id=uuid.uuid4(),
                tenant_id=tenant_id,
                user_id=user_id,
                name="initial admin key",
                prefix=key.prefix,
                salt=key.salt,
                key_hash=key.key_hash,
                scopes=["read", "write", "admin"],
                version=1,
                created_at=dt.datetime.now(dt.UTC),
            )
        )
        await session.execute(insert(api_key_directory).values(prefix=key.prefix, tenant_id=tenant_id))

    async def _finish_onboarding(
        self,
        tenant_uuid: uuid.UUID,
        request_uuid: uuid.UUID | None,
        *,
        resumed: bool,
        key: credentials.IssuedApiKey | None = None,
    ) -> Onboarded:
        tenant_id = str(tenant_uuid)
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            placement = (
                await uow.session.execute(
                    select(
                        tenant_shards.c.shard_id,
                        tenant_shards.c.epoch,
                        shards.c.core_entity_address,
                        tenants.c.default_pipeline_id,
                    )
                    .join(shards, shards.c.id == tenant_shards.c.shard_id)
                    .join(tenants, tenants.c.id == tenant_shards.c.tenant_id)
                    .where(tenant_shards.c.tenant_id == tenant_uuid)
                )
            ).one()
        shard_id, epoch, core_address, pipeline_id = placement
        try:
            app_dsn, _ = await self._shards.shard_urls(shard_id)
            if app_dsn:
                await shard_db.set_membership(app_dsn, tenant_id, int(epoch), "active")
            if pipeline_id is None:
                made = await self._pipelines.create_default_pipeline(
                    PipelineTarget(
                        tenant_id, core_address, int(epoch), pipeline_request_id(request_uuid, tenant_id)
                    )
                )
                pipeline_id = uuid.UUID(made) if made else None
        except Exception as exc:
            log.warning("onboarding step on the shard failed; undoing", tenant_id=tenant_id, error=str(exc))
            await self._undo_onboarding(tenant_uuid, shard_id)
            raise Unavailable(
                "the tenant's shard could not be prepared; nothing was created, retry",
                reason="ONBOARDING_FAILED",
            ) from exc

        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            await uow.set_tenant(tenant_id)
            if resumed:
                # The first key was never shown (the first attempt failed): replace it.
                key = credentials.issue_api_key()
                old_prefixes = (
                    await uow.session.scalars(
                        select(api_keys.c.prefix).where(api_keys.c.tenant_id == tenant_uuid)
                    )
                ).all()
                await uow.session.execute(delete(api_keys).where(api_keys.c.tenant_id == tenant_uuid))
                await uow.session.execute(
                    delete(api_key_directory).where(api_key_directory.c.prefix.in_(old_prefixes))
                )
                admin_id = await uow.session.scalar(
                    select(users.c.id).where(users.c.tenant_id == tenant_uuid, users.c.role == "admin")
                )
                assert key is not None and admin_id is not None
                await self._insert_key(uow.session, tenant_uuid, admin_id, key)
            result = await uow.session.execute(
                update(tenants)
                .where(tenants.c.id == tenant_uuid, tenants.c.status == "provisioning")
                .values(status="active", default_pipeline_id=pipeline_id, updated_at=dt.datetime.now(dt.UTC))
                .returning(*[c for c in tenants.c if c.name != "create_request_id"])
            )
            tenant_row = result.mappings().one()
            user_row = (
                (await uow.session.execute(select(users).where(users.c.tenant_id == tenant_uuid)))
                .mappings()
                .one()
            )
            key_row = (
                (await uow.session.execute(select(api_keys).where(api_keys.c.tenant_id == tenant_uuid)))
                .mappings()
                .one()
            )
            config_rows = (
                (
                    await uow.session.execute(
                        select(tenant_configurations).where(tenant_configurations.c.tenant_id == tenant_uuid)
                    )
                )
                .mappings()
                .all()
            )
            changes = [("tenants", tenant_row), ("users", user_row), ("api_keys", key_row)]
            changes += [("tenant_configurations", row) for row in config_rows]
            for table, row in changes:
                await record_change(
                    uow.session,
                    schema=SCHEMA,
                    service=SERVICE,
                    table=table,
                    tenant_id=tenant_id,
                    record_id=str(row["id"]),
                    operation="INSERT",
                    old=None,
                    new=dict(row),
                    version=1,
                )
            await uow.commit()
        assert key is not None
        return Onboarded(
            tenant=_row({**tenant_row, "shard_id": shard_id}),
            shard_id=str(shard_id),
            admin_user_id=str(user_row["id"]),
            api_key_id=str(key_row["id"]),
            api_key=key.plaintext,
            default_pipeline_id=str(pipeline_id or ""),
        )

    async def _undo_onboarding(self, tenant_uuid: uuid.UUID, shard_id: uuid.UUID) -> None:
        """Compensation of a failed onboarding: the shard membership and the directory rows
        (which cascade to the user, key and configurations). Failures here leave a
        'provisioning' tenant that a retry resumes."""
        try:
            app_dsn, _ = await self._shards.shard_urls(shard_id)
            if app_dsn:
                await shard_db.delete_membership(app_dsn, str(tenant_uuid))
            async with UnitOfWork(self._sessions, tenant_id=None) as uow:
                await uow.session.execute(
                    delete(tenants).where(tenants.c.id == tenant_uuid, tenants.c.status == "provisioning")
                )
                await uow.commit()
        except Exception as exc:
            log.warning(
                "onboarding clean-up failed; a retry resumes it", tenant_id=str(tenant_uuid), error=str(exc)
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
            default_pipeline_id=str(tenant.get("default_pipeline_id") or ""),
        )

    async def _assign_shard(self, session: AsyncSession, dedicated: bool = False) -> uuid.UUID:
        """The active shared shard with the fewest tenants that still has room; for a dedicated
        placement, an active dedicated shard that holds no tenant yet."""
        counts = (
            select(tenant_shards.c.shard_id, func.count().label("tenant_count"))
            .group_by(tenant_shards.c.shard_id)
            .subquery()
        )
        load = func.coalesce(counts.c.tenant_count, 0)
        shard_id = await session.scalar(
            select(shards.c.id)
            .outerjoin(counts, counts.c.shard_id == shards.c.id)
            .where(
                shards.c.is_active,
                shards.c.is_dedicated if dedicated else ~shards.c.is_dedicated,
                (load == 0) if dedicated else (load < shards.c.max_tenants),
            )
            .order_by(load, shards.c.name)
            .limit(1)
            .with_for_update(of=shards)
        )
        if shard_id is None:
            if dedicated:
                raise ResourceExhausted(
                    "no free dedicated shard: register an active dedicated shard (crm shard add --dedicated)",
                    reason="NO_DEDICATED_SHARD",
                )
            raise ResourceExhausted(
                "no active shard has room for another tenant (every shard is inactive or at max_tenants); "
                "register a shard or raise a shard's max_tenants",
                reason="NO_SHARD_CAPACITY",
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
        if row is None or row["status"] == "provisioning":
            raise NotFound(f"tenant {tenant_id} not found")
        return _row({k: v for k, v in row.items() if k != "create_request_id"})

    # --- the gateway's directory -------------------------------------------------------------

    async def resolve_credential(self, credential: str) -> ResolvedCredential:
        session_parts = credentials.parse_session_token(credential)
        if session_parts is not None:
            return await self._resolve_session(*session_parts)
        parsed = credentials.parse_api_key(credential)
        if parsed is None:
            raise Unauthenticated("unrecognised credential")
        prefix, secret = parsed
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            tenant_id = await uow.session.scalar(
                select(api_key_directory.c.tenant_id)
                .join(tenants, tenants.c.id == api_key_directory.c.tenant_id)
                .where(api_key_directory.c.prefix == prefix, tenants.c.status != "provisioning")
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
            cache_seconds=self._credential_cache_seconds,
        )

    async def _resolve_session(self, prefix: str, secret: str) -> ResolvedCredential:
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            tenant_id = await uow.session.scalar(
                select(api_key_directory.c.tenant_id).where(api_key_directory.c.prefix == prefix)
            )
            if tenant_id is None:
                raise Unauthenticated("unknown or expired session")
            await uow.set_tenant(str(tenant_id))
            row = (
                (
                    await uow.session.execute(
                        select(sessions, users.c.email, users.c.is_active, users.c.role)
                        .join(
                            users,
                            (users.c.id == sessions.c.user_id) & (users.c.tenant_id == sessions.c.tenant_id),
                        )
                        .where(sessions.c.prefix == prefix)
                    )
                )
                .mappings()
                .first()
            )
        stamp = dt.datetime.now(dt.UTC)
        if (
            row is None
            or row["revoked_at"] is not None
            or row["expires_at"] <= stamp
            or not row["is_active"]
            or not credentials.token_matches(secret, row["salt"], row["token_hash"])
        ):
            raise Unauthenticated("unknown, expired or revoked session")
        # Never cache a session past its expiry.
        remaining = int((row["expires_at"] - stamp).total_seconds())
        return ResolvedCredential(
            tenant_id=str(row["tenant_id"]),
            user_id=str(row["user_id"]),
            api_key_id="",
            email=row["email"],
            scopes=list(rules.ROLE_SCOPES.get(row["role"], ["read"])),
            session_id=str(row["id"]),
            cache_seconds=max(0, min(self._credential_cache_seconds, remaining)),
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
        if row is None or row["status"] == "provisioning":
            raise NotFound(f"tenant {tenant_id} not found")
        return _row(row)

    async def shard_routes(self) -> list[dict[str, Any]]:
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            rows = (await uow.session.execute(select(shards).order_by(shards.c.name))).mappings().all()
        return [_row(row) for row in rows]

    # --- platform: listing, updating and deleting tenants ---------------------------------------

    async def list_tenants(
        self, page_size: int, page_token: str, filter_text: str
    ) -> tuple[list[dict[str, Any]], str, int]:
        self._require_platform_admin()
        conditions = [tenants.c.status != "provisioning", *parse_tenant_filter(filter_text)]
        size = paging.page_size(page_size)
        fingerprint = paging.query_fingerprint("tenants", filter_text)
        cursor = paging.decode_token(page_token, fingerprint)
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            base = (
                select(*TENANT_PUBLIC, tenant_shards.c.shard_id)
                .join(tenant_shards, tenant_shards.c.tenant_id == tenants.c.id)
                .where(*conditions)
            )
            total = await uow.session.scalar(select(func.count()).select_from(base.subquery()))
            query = base
            if cursor is not None:
                query = query.where(
                    func.row(tenants.c.created_at, tenants.c.id)
                    > func.row(dt.datetime.fromisoformat(cursor[0]), uuid.UUID(cursor[1]))
                )
            rows = (
                (
                    await uow.session.execute(
                        query.order_by(tenants.c.created_at, tenants.c.id).limit(size + 1)
                    )
                )
                .mappings()
                .all()
            )
        page = [_row(r) for r in rows[:size]]
        token = (
            paging.encode_token([page[-1]["created_at"].isoformat(), page[-1]["id"]], fingerprint)
            if len(rows) > size
            else ""
        )
        return page, token, int(total or 0)

    async def update_tenant(
        self, tenant_id: str, etag: str, paths: list[str], changes: dict[str, Any]
    ) -> dict[str, Any]:
        self._require_platform_admin()
        tenant_uuid = parse_uuid(tenant_id, "tenant.id")
        check_mask(paths, ("name", "plan_type", "status", "settings"))
        violations = []
        if "name" in paths:
            name = str(changes["name"])
            if not name.strip():
                violations += invalid("tenant.name", "must not be blank").violations
            elif len(name) > 255:
                violations += invalid("tenant.name", "must be at most 255 characters").violations
        if "plan_type" in paths and changes["plan_type"] not in rules.PLAN_TYPES:
            violations += invalid("tenant.plan_type", "must be basic, professional or enterprise").violations
        if "status" in paths and changes["status"] not in rules.TENANT_STATUSES:
            violations += invalid("tenant.status", "must be active, suspended or cancelled").violations
        if violations:
            raise InvalidArgument(violations)
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            old = (
                (
                    await uow.session.execute(
                        select(*TENANT_PUBLIC).where(tenants.c.id == tenant_uuid).with_for_update()
                    )
                )
                .mappings()
                .first()
            )
            if old is None or old["status"] == "provisioning":
                raise NotFound(f"tenant {tenant_id} not found")
            check_etag(etag, old["version"], "tenant")
            values = {path: (changes[path].strip() if path == "name" else changes[path]) for path in paths}
            values.update(version=old["version"] + 1, updated_at=dt.datetime.now(dt.UTC))
            await uow.session.execute(update(tenants).where(tenants.c.id == tenant_uuid).values(values))
            new = {**dict(old), **values}
            await record_change(
                uow.session,
                schema=SCHEMA,
                service=SERVICE,
                table="tenants",
                tenant_id=tenant_id,
                record_id=tenant_id,
                operation="UPDATE",
                old=dict(old),
                new=new,
                version=new["version"],
            )
            if new["status"] != old["status"] or new["plan_type"] != old["plan_type"]:
                # The gateway drops its cached route (status, plan) for the tenant at once.
                kind = (
                    events_pb2.CONTROL_EVENT_KIND_TENANT_ACTIVATED
                    if new["status"] == "active"
                    else events_pb2.CONTROL_EVENT_KIND_TENANT_SUSPENDED
                )
                await publish_control(uow.session, kind, tenant_id)
            shard_id = await uow.session.scalar(
                select(tenant_shards.c.shard_id).where(tenant_shards.c.tenant_id == tenant_uuid)
            )
            await uow.commit()
        return _row({**new, "shard_id": shard_id})

    async def delete_tenant(self, tenant_id: str, etag: str) -> dict[str, Any]:
        """Purges the tenant's rows from its shard, then its directory rows (users, keys,
        sessions, configuration cascade), and tells every service with TENANT_DELETED."""
        self._require_platform_admin()
        tenant = await self.get_tenant(tenant_id)
        check_etag(etag, int(tenant["version"]), "tenant")
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            await set_directory_scope(uow.session)
            running = await uow.session.scalar(
                select(func.count())
                .select_from(tenant_moves)
                .where(
                    tenant_moves.c.tenant_id == uuid.UUID(tenant_id),
                    tenant_moves.c.phase.not_in(("completed", "failed")),
                )
            )
        if running:
            raise FailedPrecondition(
                "the tenant is moving between shards; delete it afterwards", reason="MOVE_RUNNING"
            )
        app_dsn, _ = await self._shards.shard_urls(uuid.UUID(tenant["shard_id"]))
        if app_dsn:
            await shard_db.purge_tenant(app_dsn, tenant_id)
            await shard_db.delete_membership(app_dsn, tenant_id)
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            await uow.session.execute(
                delete(api_key_directory).where(api_key_directory.c.tenant_id == uuid.UUID(tenant_id))
            )
            await uow.session.execute(delete(tenants).where(tenants.c.id == uuid.UUID(tenant_id)))
            await record_change(
                uow.session,
                schema=SCHEMA,
                service=SERVICE,
                table="tenants",
                tenant_id=tenant_id,
                record_id=tenant_id,
                operation="DELETE",
                old=tenant,
                new=None,
                version=int(tenant["version"]) + 1,
            )
            await publish_control(uow.session, events_pb2.CONTROL_EVENT_KIND_TENANT_DELETED, tenant_id)
            await uow.commit()
        return tenant


TENANT_FILTER_FIELDS = ("status", "plan_type", "subdomain", "shard_id")


def parse_tenant_filter(text: str) -> list[Any]:
    """A small AIP-160 subset for tenants: `field = value` joined by AND."""
    if not text.strip():
        return []
    conditions: list[Any] = []
    for clause in text.split(" AND "):
        field, op, value = clause.strip().partition("=")
        field, value = field.strip(), value.strip().strip('"')
        if not op or field not in TENANT_FILTER_FIELDS or not value:
            raise invalid(
                "filter", f"use `field = value` joined by AND, fields: {', '.join(TENANT_FILTER_FIELDS)}"
            )
        if field == "shard_id":
            conditions.append(tenant_shards.c.shard_id == parse_uuid(value, "filter"))
        else:
            conditions.append(tenants.c[field] == value)
    return conditions
