"""Use cases for tenant configuration (values optionally encrypted at rest) and system metadata
(global entries seeded from the seed model, and per-tenant overrides)."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.tenant import SCHEMA, SERVICE
from services.tenant.adapters.secrets_box import SecretBox
from services.tenant.adapters.tables import system_metadata, tenant_configurations, tenants
from services.tenant.domain import rules
from services.tenant.service_layer.common import (
    caller_tenant,
    check_etag,
    now,
    parse_uuid,
    require_platform_admin,
    require_tenant_admin,
    row_dict,
    violations_or_none,
)
from shared import paging
from shared.context import current_call
from shared.db import UnitOfWork
from shared.errors import FieldViolation, NotFound
from shared.outbox import record_change

DEFAULT_CONFIGURATIONS: tuple[tuple[str, str, Any], ...] = (
    ("ui_customization", "theme", {"primary_color": "#1976d2", "logo_url": None}),
    ("business_rules", "currency", {"default": "USD", "symbol": "$"}),
    ("notifications", "email_settings", {"enabled": True, "daily_digest": True}),
)


def default_configuration_rows(tenant_id: uuid.UUID) -> list[dict[str, Any]]:
    stamp = now()
    return [
        {
            "id": uuid.uuid4(),
            "tenant_id": tenant_id,
            "config_category": category,
            "config_key": key,
            "config_value": value,
            "encrypted_value": None,
            "is_encrypted": False,
            "version": 1,
            "created_at": stamp,
            "updated_at": stamp,
        }
        for category, key, value in DEFAULT_CONFIGURATIONS
    ]


class ConfigurationUseCases:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], box: SecretBox) -> None:
        self._sessions = sessions
        self._box = box

    def _public(self, row: Any) -> dict[str, Any]:
        values = row_dict(row)
        if values["is_encrypted"]:
            values["config_value"] = self._box.decrypt_json(values["encrypted_value"])
        values.pop("encrypted_value", None)
        return values

    async def get(self, category: str, key: str) -> dict[str, Any]:
        tenant_id = caller_tenant()
        violations_or_none(
            rules.validate_name(category, "category", 100, rules.CONFIG_NAME_PATTERN)
            + rules.validate_name(key, "key", 100, rules.CONFIG_NAME_PATTERN)
        )
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            row = (
                (
                    await uow.session.execute(
                        select(tenant_configurations).where(
                            tenant_configurations.c.tenant_id == uuid.UUID(tenant_id),
                            tenant_configurations.c.config_category == category,
                            tenant_configurations.c.config_key == key,
                        )
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"configuration {category}/{key} not found")
        return self._public(row)

    async def set(self, category: str, key: str, value: Any, is_encrypted: bool, etag: str) -> dict[str, Any]:
        tenant_id = caller_tenant()
        violations = rules.validate_name(
            category, "configuration.category", 100, rules.CONFIG_NAME_PATTERN
        ) + rules.validate_name(key, "configuration.key", 100, rules.CONFIG_NAME_PATTERN)
        if value is None:
            violations += [FieldViolation("configuration.value", "is required")]
        violations_or_none(violations)
        stored: dict[str, Any] = (
            {"config_value": None, "encrypted_value": self._box.encrypt_json(value), "is_encrypted": True}
            if is_encrypted
            else {"config_value": value, "encrypted_value": None, "is_encrypted": False}
        )
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            await require_tenant_admin(uow.session)
            old = (
                (
                    await uow.session.execute(
                        select(tenant_configurations)
                        .where(
                            tenant_configurations.c.tenant_id == uuid.UUID(tenant_id),
                            tenant_configurations.c.config_category == category,
                            tenant_configurations.c.config_key == key,
                        )
                        .with_for_update()
                    )
                )
                .mappings()
                .first()
            )
            stamp = now()
            if old is None:
                new = {
                    "id": uuid.uuid4(),
                    "tenant_id": uuid.UUID(tenant_id),
                    "config_category": category,
                    "config_key": key,
                    **stored,
                    "version": 1,
                    "created_at": stamp,
                    "updated_at": stamp,
                }
                await uow.session.execute(insert(tenant_configurations).values(new))
                operation = "INSERT"
            else:
                check_etag(etag, old["version"], "configuration")
                new = {**dict(old), **stored, "version": old["version"] + 1, "updated_at": stamp}
                await uow.session.execute(
                    update(tenant_configurations)
                    .where(tenant_configurations.c.id == old["id"])
                    .values(**stored, version=new["version"], updated_at=stamp)
                )
                operation = "UPDATE"
            # Encrypted values travel as neither plaintext nor ciphertext: the event shows only
            # that the value is encrypted (encrypted_value is a secret column, config_value null).
            await record_change(
                uow.session,
                schema=SCHEMA,
                service=SERVICE,
                table="tenant_configurations",
                tenant_id=tenant_id,
                record_id=str(new["id"]),
                operation=operation,
                old=dict(old) if old is not None else None,
                new=new,
                version=new["version"],
            )
            await uow.commit()
        return self._public(new)

    async def list_configurations(
        self, category: str, page_size: int, page_token: str
    ) -> tuple[list[dict[str, Any]], str, int]:
        tenant_id = caller_tenant()
        if category:
            violations_or_none(rules.validate_name(category, "category", 100, rules.CONFIG_NAME_PATTERN))
        size = paging.page_size(page_size)
        fingerprint = paging.query_fingerprint("configurations", tenant_id, category)
        cursor = paging.decode_token(page_token, fingerprint)
        where = [tenant_configurations.c.tenant_id == uuid.UUID(tenant_id)]
        if category:
            where.append(tenant_configurations.c.config_category == category)
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            total = await uow.session.scalar(
                select(func.count()).select_from(tenant_configurations).where(*where)
            )
            query = select(tenant_configurations).where(*where)
            if cursor is not None:
                query = query.where(
                    func.row(tenant_configurations.c.config_category, tenant_configurations.c.config_key)
                    > func.row(cursor[0], cursor[1])
                )
            rows = (
                (
                    await uow.session.execute(
                        query.order_by(
                            tenant_configurations.c.config_category, tenant_configurations.c.config_key
                        ).limit(size + 1)
                    )
                )
                .mappings()
                .all()
            )
        page = [self._public(r) for r in rows[:size]]
        token = (
            paging.encode_token([page[-1]["config_category"], page[-1]["config_key"]], fingerprint)
            if len(rows) > size
            else ""
        )
        return page, token, int(total or 0)

    # --- system metadata ---------------------------------------------------------------------

    async def list_metadata(
        self, metadata_type: str, tenant_id_filter: str, page_size: int, page_token: str
    ) -> tuple[list[dict[str, Any]], str, int]:
        call = current_call()
        if call.platform_admin:
            tenant_id = str(parse_uuid(tenant_id_filter, "tenant_id")) if tenant_id_filter else None
        else:
            # A tenant sees the global entries and its own, never another tenant's.
            tenant_id = caller_tenant()
        size = paging.page_size(page_size)
        fingerprint = paging.query_fingerprint("metadata", tenant_id, metadata_type)
        cursor = paging.decode_token(page_token, fingerprint)
        offset = int(cursor[0]) if cursor else 0
        where = []
        if metadata_type:
            where.append(system_metadata.c.metadata_type == metadata_type)
        async with UnitOfWork(self._sessions, tenant_id) as uow:
            total = await uow.session.scalar(select(func.count()).select_from(system_metadata).where(*where))
            rows = (
                (
                    await uow.session.execute(
                        select(system_metadata)
                        .where(*where)
                        .order_by(
                            system_metadata.c.tenant_id.nulls_first(),
                            system_metadata.c.metadata_type,
                            system_metadata.c.metadata_key,
                        )
                        .offset(offset)
                        .limit(size + 1)
                    )
                )
                .mappings()
                .all()
            )
        page = [row_dict(r) for r in rows[:size]]
        token = paging.encode_token([offset + size], fingerprint) if len(rows) > size else ""
        return page, token, int(total or 0)

    async def set_metadata(
        self, tenant_id: str, metadata_type: str, metadata_key: str, value: Any, description: str
    ) -> dict[str, Any]:
        require_platform_admin()
        violations = rules.validate_name(
            metadata_type, "system_metadata.metadata_type", 100, rules.CONFIG_NAME_PATTERN
        ) + rules.validate_name(metadata_key, "system_metadata.metadata_key", 200, rules.CONFIG_NAME_PATTERN)
        if value is None:
            violations += [FieldViolation("system_metadata.value", "is required")]
        elif (metadata_type, metadata_key) == ("system_config", "password_policy"):
            violations += rules.validate_password_policy(value, "system_metadata.value")
        tenant_uuid = parse_uuid(tenant_id, "system_metadata.tenant_id") if tenant_id else None
        violations_or_none(violations)
        async with UnitOfWork(self._sessions, str(tenant_uuid) if tenant_uuid else None) as uow:
            if tenant_uuid is not None and not await uow.session.scalar(
                select(tenants.c.id).where(tenants.c.id == tenant_uuid)
            ):
                raise NotFound(f"tenant {tenant_id} not found")
            old = (
                (
                    await uow.session.execute(
                        select(system_metadata)
                        .where(
                            system_metadata.c.tenant_id.is_(None)
                            if tenant_uuid is None
                            else system_metadata.c.tenant_id == tenant_uuid,
                            system_metadata.c.metadata_type == metadata_type,
                            system_metadata.c.metadata_key == metadata_key,
                        )
                        .with_for_update()
                    )
                )
                .mappings()
                .first()
            )
            stamp = now()
            if old is None:
                new = {
                    "id": uuid.uuid4(),
                    "tenant_id": tenant_uuid,
                    "metadata_type": metadata_type,
                    "metadata_key": metadata_key,
                    "metadata_value": value,
                    "description": description,
                    "is_system": False,
                    "version": 1,
                    "created_at": stamp,
                    "updated_at": stamp,
                }
                await uow.session.execute(insert(system_metadata).values(new))
            else:
                new = {
                    **dict(old),
                    "metadata_value": value,
                    "description": description or old["description"],
                    "version": old["version"] + 1,
                    "updated_at": stamp,
                }
                await uow.session.execute(
                    update(system_metadata)
                    .where(system_metadata.c.id == old["id"])
                    .values(
                        metadata_value=value,
                        description=new["description"],
                        version=new["version"],
                        updated_at=stamp,
                    )
                )
            await record_change(
                uow.session,
                schema=SCHEMA,
                service=SERVICE,
                table="system_metadata",
                # Global entries have no tenant: their events go under the nil tenant id.
                tenant_id=str(tenant_uuid or uuid.UUID(int=0)),
                record_id=str(new["id"]),
                operation="INSERT" if old is None else "UPDATE",
                old=dict(old) if old is not None else None,
                new=new,
                version=new["version"],
            )
            await uow.commit()
        return row_dict(new)


async def set_directory_scope(session: AsyncSession) -> None:
    """Marks the transaction as a platform call, which tenant_moves' policy admits."""
    await session.execute(text("SELECT set_config('app.directory_scope', 'platform', true)"))
