"""Use cases for the shard directory: registering shards (and running their migrations),
listing them with their load, changing them, and moving a tenant between shards online.

A move (see docs/tenant.md for the protocol):
  1. target membership 'incoming' (the target's backends refuse the tenant), stale rows purged;
  2. bulk copy from a REPEATABLE READ snapshot of the source while writes go on;
  3. catch-up, twice, writes still on: copy the rows written since the last round's snapshot
     (found by the source from their transaction ids); then every table's count and checksum
     compared;
  4. block: source membership 'blocked' (waits for writes in flight; later writes are refused
     with UNAVAILABLE); the last delta is copied; counts and the touched rows compared;
  5. flip: target membership 'active' at epoch+1, directory epoch+1 and shard, `tenant.moved`
     control event (same transaction), source membership 'moved_out';
  6. clean-up: the tenant's rows are deleted from the source.
Any failure before the flip undoes 1-4: the source is unblocked and the target purged, so the
tenant stays whole and writable on the source.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, insert, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from crm.v1 import events_pb2
from services.tenant.adapters import shard_db
from services.tenant.adapters.secrets_box import SecretBox
from services.tenant.adapters.tables import shards, tenant_moves, tenant_shards, tenants
from services.tenant.domain import rules
from services.tenant.domain.moves import Delta, TableInfo, rows_vanished
from services.tenant.service_layer.common import (
    check_mask,
    now,
    parse_uuid,
    publish_control,
    require_platform_admin,
    row_dict,
    violations_or_none,
)
from services.tenant.service_layer.configuration import set_directory_scope
from shared.db import UnitOfWork
from shared.errors import (
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from shared.logging import get_logger

log = get_logger(__name__)

SHARD_PUBLIC = [c for c in shards.c if not c.name.endswith("_encrypted")]


class WrongEncryptionKey(RuntimeError):
    """The configured CRM_ENCRYPTION_KEY is not the one the directory's secrets were written with."""


@dataclass(frozen=True, slots=True)
class ShardSpec:
    name: str
    core_entity_address: str
    custom_object_address: str
    database_url: str
    owner_database_url: str
    max_tenants: int
    active: bool
    dedicated: bool


def _validate_addresses(values: dict[str, str]) -> list[FieldViolation]:
    violations = []
    for field, value in values.items():
        if not value:
            violations.append(FieldViolation(field, "is required"))
        elif not rules.ADDRESS_PATTERN.match(value):
            violations.append(FieldViolation(field, "must be host:port"))
    return violations


def _validate_url(value: str, field: str) -> list[FieldViolation]:
    if not value:
        return [FieldViolation(field, "is required")]
    if not value.startswith(("postgresql://", "postgres://", "postgresql+asyncpg://")):
        return [FieldViolation(field, "must be a postgresql:// URL")]
    return []


class ShardUseCases:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], box: SecretBox) -> None:
        self._sessions = sessions
        self._box = box
        self._moves: set[asyncio.Task[None]] = set()

    # --- shards ------------------------------------------------------------------------------

    async def create_shard(self, spec: ShardSpec) -> dict[str, Any]:
        require_platform_admin()
        violations = rules.validate_name(spec.name, "shard.name", 100, rules.SHARD_NAME_PATTERN)
        violations += _validate_addresses(
            {
                "shard.core_entity_address": spec.core_entity_address,
                "shard.custom_object_address": spec.custom_object_address,
            }
        )
        violations += _validate_url(spec.database_url, "shard.database_url")
        violations += _validate_url(spec.owner_database_url, "shard.owner_database_url")
        if spec.max_tenants < 0:
            violations.append(FieldViolation("shard.max_tenants", "must be positive (0 means 1000)"))
        violations_or_none(violations)
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            if await uow.session.scalar(select(shards.c.id).where(shards.c.name == spec.name)):
                raise AlreadyExists(f"shard {spec.name!r} exists", reason="SHARD_NAME_TAKEN")
        try:
            await shard_db.migrate_shard(spec.owner_database_url, spec.database_url, include_services=True)
        except Exception as exc:
            log.warning("shard migrations failed", shard=spec.name, error=str(exc))
            raise FailedPrecondition(
                f"the shard database could not be migrated: {type(exc).__name__}",
                reason="SHARD_MIGRATION_FAILED",
            ) from exc
        row = {
            "id": uuid.uuid4(),
            "name": spec.name,
            "core_entity_address": spec.core_entity_address,
            "custom_object_address": spec.custom_object_address,
            "max_tenants": spec.max_tenants or 1000,
            "is_active": spec.active,
            "is_dedicated": spec.dedicated,
            "created_at": now(),
            "database_url_encrypted": self._box.encrypt_text(spec.database_url),
            "owner_database_url_encrypted": self._box.encrypt_text(spec.owner_database_url),
        }
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            try:
                await uow.session.execute(insert(shards).values(row))
                await uow.commit()
            except IntegrityError as exc:
                raise AlreadyExists(f"shard {spec.name!r} exists", reason="SHARD_NAME_TAKEN") from exc
        return {
            **row_dict({k: v for k, v in row.items() if not k.endswith("_encrypted")}),
            "tenant_count": 0,
            "has_database_url": True,
        }

    async def list_shards(self) -> list[dict[str, Any]]:
        require_platform_admin()
        return await self._shards_with_load()

    async def _shards_with_load(self, shard_id: uuid.UUID | None = None) -> list[dict[str, Any]]:
        counts = (
            select(tenant_shards.c.shard_id, func.count().label("tenant_count"))
            .group_by(tenant_shards.c.shard_id)
            .subquery()
        )
        query = (
            select(
                *SHARD_PUBLIC,
                func.coalesce(counts.c.tenant_count, 0).label("tenant_count"),
                shards.c.database_url_encrypted.is_not(None).label("has_database_url"),
            )
            .outerjoin(counts, counts.c.shard_id == shards.c.id)
            .order_by(shards.c.name)
        )
        if shard_id is not None:
            query = query.where(shards.c.id == shard_id)
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            rows = (await uow.session.execute(query)).mappings().all()
        return [row_dict(r) for r in rows]

    async def update_shard(self, shard_id: str, paths: list[str], spec: ShardSpec) -> dict[str, Any]:
        require_platform_admin()
        shard_uuid = parse_uuid(shard_id, "shard.id")
        check_mask(
            paths,
            (
                "max_tenants",
                "active",
                "core_entity_address",
                "custom_object_address",
                "database_url",
                "owner_database_url",
            ),
        )
        violations: list[FieldViolation] = []
        values: dict[str, Any] = {}
        for path in paths:
            if path == "max_tenants":
                if spec.max_tenants <= 0:
                    violations.append(FieldViolation("shard.max_tenants", "must be positive"))
                values["max_tenants"] = spec.max_tenants
            elif path == "active":
                values["is_active"] = spec.active
            elif path in ("core_entity_address", "custom_object_address"):
                violations += _validate_addresses({f"shard.{path}": getattr(spec, path)})
                values[path] = getattr(spec, path)
            else:
                violations += _validate_url(getattr(spec, path), f"shard.{path}")
                values[f"{path}_encrypted"] = (
                    self._box.encrypt_text(getattr(spec, path)) if getattr(spec, path) else None
                )
        violations_or_none(violations)
        if "database_url" in paths and "owner_database_url" in paths:
            # New connection settings: make sure the membership schema is there before use.
            try:
                await shard_db.migrate_shard(
                    spec.owner_database_url, spec.database_url, include_services=False
                )
            except Exception as exc:
                raise FailedPrecondition(
                    f"the shard database could not be migrated: {type(exc).__name__}",
                    reason="SHARD_MIGRATION_FAILED",
                ) from exc
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            result = await uow.session.execute(update(shards).where(shards.c.id == shard_uuid).values(values))
            if result.rowcount == 0:  # type: ignore[attr-defined]
                raise NotFound(f"shard {shard_id} not found")
            await uow.commit()
        if "database_url" in paths and "owner_database_url" in paths:
            await self._backfill_membership(shard_uuid, spec.database_url)
        return (await self._shards_with_load(shard_uuid))[0]

    async def shard_urls(self, shard_id: uuid.UUID) -> tuple[str, str]:
        """The app and owner database URLs of a shard ('' when the directory has none)."""
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            row = (
                await uow.session.execute(
                    select(shards.c.database_url_encrypted, shards.c.owner_database_url_encrypted).where(
                        shards.c.id == shard_uuid_or(shard_id)
                    )
                )
            ).first()
        if row is None:
            raise NotFound(f"shard {shard_id} not found")
        return (
            self._box.decrypt_text(row[0]) if row[0] else "",
            self._box.decrypt_text(row[1]) if row[1] else "",
        )

    async def check_encryption_key(self) -> None:
        """Refuses to start with a key that cannot open what the directory stores. Started
        anyway, bootstrap would re-encrypt the shard URLs with the wrong key (hiding the mistake)
        while every tenant's encrypted settings stayed unreadable, and onboarding would fail
        half-way instead of at start-up."""
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            sample = await uow.session.scalar(
                select(shards.c.database_url_encrypted)
                .where(shards.c.database_url_encrypted.is_not(None))
                .limit(1)
            )
        if sample is None:
            return
        try:
            self._box.decrypt_text(sample)
        except RuntimeError as exc:
            raise WrongEncryptionKey(
                "CRM_ENCRYPTION_KEY cannot decrypt the shard connection settings stored in the directory; "
                "start the tenant service with the key they were written with"
            ) from exc

    async def register_bootstrap_shards(self, specs: list[dict[str, Any]]) -> None:
        """Registers the shards named in settings that the directory does not know yet, keeps
        their connection settings current, migrates their membership schema, and makes sure
        every tenant mapped to them is a member (tenants onboarded before membership existed)."""
        for spec in specs:
            dsn = str(spec.get("dsn") or spec.get("database_url") or "")
            owner = str(spec.get("owner_dsn") or spec.get("owner_database_url") or "")
            async with UnitOfWork(self._sessions, tenant_id=None) as uow:
                shard_id = await uow.session.scalar(select(shards.c.id).where(shards.c.name == spec["name"]))
                secrets = {
                    "database_url_encrypted": self._box.encrypt_text(dsn) if dsn else None,
                    "owner_database_url_encrypted": self._box.encrypt_text(owner) if owner else None,
                }
                if shard_id is None:
                    shard_id = uuid.uuid4()
                    await uow.session.execute(
                        insert(shards).values(
                            id=shard_id,
                            name=spec["name"],
                            core_entity_address=spec["core_entity_address"],
                            custom_object_address=spec["custom_object_address"],
                            max_tenants=int(spec.get("max_tenants", 1000)),
                            is_active=True,
                            is_dedicated=bool(spec.get("dedicated", False)),
                            created_at=now(),
                            **secrets,
                        )
                    )
                else:
                    await uow.session.execute(
                        update(shards)
                        .where(shards.c.id == shard_id)
                        .values(
                            core_entity_address=spec["core_entity_address"],
                            custom_object_address=spec["custom_object_address"],
                            **{k: v for k, v in secrets.items() if v is not None},
                        )
                    )
                await uow.commit()
            if dsn and owner:
                await shard_db.migrate_shard(owner, dsn, include_services=False)
                await self._backfill_membership(shard_id, dsn)

    async def _backfill_membership(self, shard_id: uuid.UUID, dsn: str) -> None:
        """Makes every tenant the directory places on the shard a member there (tenants
        onboarded while the directory had no URL for the shard have no membership row yet, and
        the shard's backends refuse non-members once the membership table exists)."""
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            members = (
                await uow.session.execute(
                    select(tenant_shards.c.tenant_id, tenant_shards.c.epoch)
                    .join(tenants, tenants.c.id == tenant_shards.c.tenant_id)
                    .where(tenant_shards.c.shard_id == shard_id, tenants.c.status != "provisioning")
                )
            ).all()
        for tenant_id, epoch in members:
            if await shard_db.membership(dsn, str(tenant_id)) is None:
                await shard_db.set_membership(dsn, str(tenant_id), int(epoch), "active")

    # --- moves -------------------------------------------------------------------------------

    async def move_tenant(self, tenant_id: str, target_shard_id: str) -> dict[str, Any]:
        require_platform_admin()
        violations: list[FieldViolation] = []
        try:
            tenant_uuid = parse_uuid(tenant_id, "tenant_id")
        except InvalidArgument as exc:
            violations += exc.violations
        try:
            target_uuid = parse_uuid(target_shard_id, "target_shard_id")
        except InvalidArgument as exc:
            violations += exc.violations
        violations_or_none(violations)
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            await set_directory_scope(uow.session)
            placement = (
                await uow.session.execute(
                    select(tenant_shards.c.shard_id, tenant_shards.c.epoch, tenants.c.status)
                    .join(tenants, tenants.c.id == tenant_shards.c.tenant_id)
                    .where(tenant_shards.c.tenant_id == tenant_uuid)
                )
            ).first()
            if placement is None or placement[2] == "provisioning":
                raise NotFound(f"tenant {tenant_id} not found")
            source_uuid = placement[0]
            if source_uuid == target_uuid:
                raise FailedPrecondition("the tenant already lives on that shard", reason="SAME_SHARD")
            target = (
                await uow.session.execute(
                    select(shards.c.is_active, shards.c.max_tenants).where(shards.c.id == target_uuid)
                )
            ).first()
            if target is None:
                raise NotFound(f"shard {target_shard_id} not found")
            load = await uow.session.scalar(
                select(func.count()).select_from(tenant_shards).where(tenant_shards.c.shard_id == target_uuid)
            )
            # An inactive shard takes no tenants by automatic placement, but an operator may
            # still move a tenant onto it on purpose (a dedicated or staging shard).
            if int(load or 0) >= target[1]:
                raise FailedPrecondition("the target shard is full", reason="SHARD_FULL")
            move = {
                "id": uuid.uuid4(),
                "tenant_id": tenant_uuid,
                "source_shard_id": source_uuid,
                "target_shard_id": target_uuid,
                "phase": "pending",
                "rows_copied": 0,
                "rows_total": 0,
                "errors": [],
                "verified_tables": [],
                "write_block_ms": 0,
                "epoch": placement[1],
                "created_at": now(),
                "updated_at": now(),
            }
            try:
                await uow.session.execute(insert(tenant_moves).values(move))
                await uow.commit()
            except IntegrityError as exc:
                raise AlreadyExists(
                    "a move of this tenant is already running", reason="MOVE_RUNNING"
                ) from exc
        task = asyncio.create_task(self._run_move(move["id"]))
        self._moves.add(task)
        task.add_done_callback(self._moves.discard)
        return row_dict(move)

    async def get_move(self, move_id: str) -> dict[str, Any]:
        require_platform_admin()
        move_uuid = parse_uuid(move_id, "id")
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            await set_directory_scope(uow.session)
            row = (
                (await uow.session.execute(select(tenant_moves).where(tenant_moves.c.id == move_uuid)))
                .mappings()
                .first()
            )
        if row is None:
            raise NotFound(f"tenant move {move_id} not found")
        return row_dict(row)

    async def fail_interrupted_moves(self) -> None:
        """A move whose process died: undo it the same way a failure does."""
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            await set_directory_scope(uow.session)
            ids = (
                await uow.session.scalars(
                    select(tenant_moves.c.id).where(tenant_moves.c.phase.not_in(("completed", "failed")))
                )
            ).all()
        for move_id in ids:
            task = asyncio.create_task(self._run_move(move_id, resume=True))
            self._moves.add(task)
            task.add_done_callback(self._moves.discard)

    async def _update_move(self, move_id: uuid.UUID, **values: Any) -> None:
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            await set_directory_scope(uow.session)
            await uow.session.execute(
                update(tenant_moves).where(tenant_moves.c.id == move_id).values(**values, updated_at=now())
            )
            await uow.commit()

    async def _run_move(self, move_id: uuid.UUID, resume: bool = False) -> None:
        # A session-level advisory lock marks the move as running in this process: another
        # replica starting up skips it instead of rolling back a live move, and a process that
        # dies releases it with its connection.
        owner = self._sessions()
        key = {"key": f"tenant-move:{move_id}"}
        running_here = False
        try:
            running_here = bool(await owner.scalar(text("SELECT pg_try_advisory_lock(hashtext(:key))"), key))
            await owner.commit()
            if running_here:
                await self._run_move_locked(move_id, resume)
        finally:
            try:
                if running_here:
                    await owner.execute(text("SELECT pg_advisory_unlock(hashtext(:key))"), key)
                    await owner.commit()
            finally:
                await owner.close()

    async def _run_move_locked(self, move_id: uuid.UUID, resume: bool) -> None:
        async with UnitOfWork(self._sessions, tenant_id=None) as uow:
            await set_directory_scope(uow.session)
            move = (
                (await uow.session.execute(select(tenant_moves).where(tenant_moves.c.id == move_id)))
                .mappings()
                .one()
            )
        tenant_id = str(move["tenant_id"])
        run = _MoveRun(self, move_id, tenant_id)
        try:
            source_dsn, _ = await self.shard_urls(move["source_shard_id"])
            target_dsn, target_owner = await self.shard_urls(move["target_shard_id"])
            if not source_dsn or not target_dsn:
                raise FailedPrecondition("a shard of this move has no database URL in the directory")
            run.source_dsn, run.target_dsn = source_dsn, target_dsn
            if resume and move["phase"] == "cleaning_up":
                # The flip committed; make sure the source refuses the tenant, then clean it.
                await shard_db.set_membership(source_dsn, tenant_id, int(move["epoch"]), "moved_out")
                await run.clean_source()
                await self._update_move(move_id, phase="completed")
                return
            if resume:
                raise Unavailable("the tenant service restarted during the move")
            source_owner = (await self.shard_urls(move["source_shard_id"]))[1]
            for owner_dsn, app_dsn in ((source_owner, source_dsn), (target_owner, target_dsn)):
                if owner_dsn:
                    await shard_db.migrate_shard(owner_dsn, app_dsn, include_services=False)
            await run.execute(int(move["epoch"]), str(move["target_shard_id"]))
        except Exception as exc:
            log.warning("tenant move failed; rolling back", move_id=str(move_id), error=str(exc))
            await run.roll_back(int(move["epoch"]), f"{type(exc).__name__}: {exc}")


# Per table: primary key -> row digest of the source rows the target holds.
SourceState = dict[str, dict[str, str]]


def checksum_of(digests: dict[str, str]) -> str:
    """An order-independent checksum of a table's rows: md5 over the sorted row digests, the
    same value shard_db.checksum computes on a server (empty string for no rows)."""
    if not digests:
        return ""
    return hashlib.md5("".join(sorted(digests.values())).encode(), usedforsecurity=False).hexdigest()


def shard_uuid_or(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(value)


class _MoveRun:
    """One move's steps; keeps what it needs to undo them."""

    def __init__(self, owner: ShardUseCases, move_id: uuid.UUID, tenant_id: str) -> None:
        self.owner = owner
        self.move_id = move_id
        self.tenant_id = tenant_id
        self.source_dsn = ""
        self.target_dsn = ""
        self.rows_copied = 0
        self.flipped = False
        self.blocked_at: float | None = None
        self.last_round: dict[str, Delta] = {}
        #: The source snapshot's oldest running transaction id, as of the last round.
        self.horizon = 0

    async def execute(self, epoch: int, target_shard_id: str) -> None:
        tenant_id = self.tenant_id
        await shard_db.set_membership(self.target_dsn, tenant_id, epoch, "incoming")
        await shard_db.purge_tenant(self.target_dsn, tenant_id)

        await self.owner._update_move(self.move_id, phase="copying")
        tables, state = await self._bulk_copy()

        await self.owner._update_move(self.move_id, phase="catching_up", rows_copied=self.rows_copied)
        # Two rounds while writes go on: the second copies only what changed during the first,
        # so the round inside the write block has little left to do.
        state = await self._copy_delta(tables, state)
        state = await self._copy_delta(tables, state)
        # The full per-table count and checksum comparison runs here, before the block: the
        # target is 'incoming' (its backends refuse the tenant), so only this move writes it,
        # and what the block round changes is verified row by row below.
        await self._verify(tables, state)

        await self.owner._update_move(self.move_id, phase="blocked", rows_copied=self.rows_copied)
        self.blocked_at = time.perf_counter()
        await shard_db.set_membership(self.source_dsn, tenant_id, epoch, "blocked")
        blocked = time.perf_counter() - self.blocked_at
        frozen = await self._copy_delta(tables, state)
        synced = time.perf_counter() - self.blocked_at
        await self._verify_last_round(tables, frozen)
        log.info(
            "tenant move: writes blocked",
            move_id=str(self.move_id),
            wait_for_writers_ms=round(blocked * 1000),
            delta_ms=round((synced - blocked) * 1000),
            verify_ms=round((time.perf_counter() - self.blocked_at - synced) * 1000),
        )

        new_epoch = epoch + 1
        await shard_db.set_membership(self.target_dsn, tenant_id, new_epoch, "active")
        async with UnitOfWork(self.owner._sessions, tenant_id=None) as uow:
            await set_directory_scope(uow.session)
            await uow.session.execute(
                update(tenant_shards)
                .where(tenant_shards.c.tenant_id == uuid.UUID(tenant_id))
                .values(shard_id=uuid.UUID(target_shard_id), epoch=new_epoch, assigned_at=now())
            )
            await publish_control(
                uow.session,
                events_pb2.CONTROL_EVENT_KIND_TENANT_MOVED,
                tenant_id,
                shard_id=target_shard_id,
                epoch=new_epoch,
            )
            await uow.session.execute(
                update(tenant_moves)
                .where(tenant_moves.c.id == self.move_id)
                .values(
                    phase="cleaning_up",
                    epoch=new_epoch,
                    rows_copied=self.rows_copied,
                    updated_at=now(),
                )
            )
            await uow.commit()
        self.flipped = True
        # From here the target is authoritative; the source refuses the tenant entirely.
        for attempt in range(5):
            try:
                await shard_db.set_membership(self.source_dsn, tenant_id, new_epoch, "moved_out")
                break
            except Exception:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.2 * (attempt + 1))
        block_ms = int((time.perf_counter() - self.blocked_at) * 1000)
        log.info("tenant move: writes released", move_id=str(self.move_id), write_block_ms=block_ms)
        # The report's checksums sort every row digest: done once the writes are released.
        verified = [
            f"{table.qualified} rows={len(frozen[table.qualified])} "
            f"checksum={checksum_of(frozen[table.qualified])[:12]} ok"
            for table in tables
        ]
        await self.owner._update_move(self.move_id, write_block_ms=block_ms, verified_tables=verified)
        await self.clean_source()
        await self.owner._update_move(self.move_id, phase="completed")

    async def _bulk_copy(self) -> tuple[list[TableInfo], SourceState]:
        """Copies every table from one REPEATABLE READ snapshot of the source, so foreign keys
        between the copied tables are consistent; the target gets it all in one transaction.
        Returns the snapshot's row digests, which the target now equals; the first catch-up
        round reads only what was written since (`self.horizon`)."""
        state: SourceState = {}
        async with shard_db.tenant_transaction(
            self.source_dsn, self.tenant_id, isolation="repeatable_read", readonly=True
        ) as source:
            self.horizon = await shard_db.horizon(source)
            tables = await shard_db.tenant_tables(source)
            async with shard_db.tenant_transaction(self.target_dsn, self.tenant_id) as target:
                target_tables = {t.qualified: t for t in await shard_db.tenant_tables(target)}
                for table in tables:
                    other = target_tables.get(table.qualified)
                    if other is None or set(table.columns) - set(other.columns):
                        raise FailedPrecondition(
                            f"the target shard's {table.qualified} lacks columns of the source; "
                            "migrate the target first"
                        )
                    if not table.primary_key:
                        raise FailedPrecondition(f"{table.qualified} has no primary key; it cannot be moved")
                    self.rows_copied += await shard_db.stream_rows(source, target, table, self.tenant_id)
                    state[table.qualified] = await shard_db.digests(source, table, self.tenant_id)
                await self.owner._update_move(self.move_id, rows_total=self.rows_copied)
        return tables, state

    async def _copy_delta(self, tables: list[TableInfo], state: SourceState) -> SourceState:
        """Copies to the target what was written on the source since the last round's snapshot
        (`self.horizon`) and returns `state`, the source rows the target holds, updated in place
        (a large tenant's state is big, and the old one is not needed again).

        The source finds the rows written since on its own, so a round costs one scan there and
        sends back only those rows: little work inside the write block. A count tells whether
        rows vanished; only then are the keys read to find which. Verification afterwards reads
        the target itself, so a wrong assumption fails the move rather than passing unnoticed."""
        async with (
            shard_db.tenant_transaction(
                self.source_dsn, self.tenant_id, isolation="repeatable_read", readonly=True
            ) as source,
            shard_db.tenant_transaction(self.target_dsn, self.tenant_id) as target,
        ):
            since, self.horizon = self.horizon, await shard_db.horizon(source)
            deltas: list[tuple[TableInfo, Delta]] = []
            for table in tables:
                known = state[table.qualified]
                written = await shard_db.digests(source, table, self.tenant_id, written_since=since)
                count = await shard_db.row_count(source, table, self.tenant_id)
                gone = (
                    set(known) - await shard_db.keys(source, table, self.tenant_id)
                    if rows_vanished(known, written, count)
                    else set()
                )
                change = Delta(
                    upsert=sorted(k for k, digest in written.items() if known.get(k) != digest),
                    delete=sorted(gone),
                )
                for key in gone:
                    del known[key]
                known.update(written)
                deltas.append((table, change))
            self.last_round = {table.qualified: change for table, change in deltas}
            # Deletions children first, upserts parents first.
            for table, change in reversed(deltas):
                if change.delete:
                    await shard_db.delete_rows(target, table, self.tenant_id, change.delete)
            for table, change in deltas:
                if change.upsert:
                    rows_json, count = await shard_db.fetch_rows_json(
                        source, table, self.tenant_id, change.upsert
                    )
                    await shard_db.insert_rows_json(target, table, rows_json, upsert=True)
                    self.rows_copied += count
        return state

    async def _verify(self, tables: list[TableInfo], source_state: SourceState) -> None:
        """Per table: the target's row count and checksum (over every row's digest) must equal
        the source's as last copied."""
        async with shard_db.tenant_transaction(self.target_dsn, self.tenant_id, readonly=True) as target:
            for table in tables:
                expected = source_state[table.qualified]
                source_sum = (len(expected), checksum_of(expected))
                # Counted and summed on the target's server: one row back per table.
                target_sum = await shard_db.checksum(target, table, self.tenant_id)
                if source_sum != target_sum:
                    sums = "equal" if source_sum[1] == target_sum[1] else "differ"
                    raise FailedPrecondition(
                        f"verification failed for {table.qualified}: source {source_sum[0]} rows, "
                        f"target {target_sum[0]} rows, checksums {sums}"
                    )

    async def _verify_last_round(self, tables: list[TableInfo], source_state: SourceState) -> None:
        """Inside the write block: every table's row count, and the rows the last round touched
        compared digest by digest. Together with the full comparison before the block (and no
        other writer on the target) the target now equals the frozen source."""
        async with shard_db.tenant_transaction(self.target_dsn, self.tenant_id, readonly=True) as target:
            for table in tables:
                expected = source_state[table.qualified]
                count = await shard_db.row_count(target, table, self.tenant_id)
                touched = self.last_round[table.qualified].upsert
                found = await shard_db.digests(target, table, self.tenant_id, keys=touched) if touched else {}
                wrong = [k for k in touched if found.get(k) != expected[k]]
                if count != len(expected) or wrong:
                    raise FailedPrecondition(
                        f"verification failed for {table.qualified}: source {len(expected)} rows, "
                        f"target {count} rows, {len(wrong)} changed rows differ"
                    )

    async def clean_source(self) -> None:
        await shard_db.purge_tenant(self.source_dsn, self.tenant_id)

    async def roll_back(self, epoch: int, error: str) -> None:
        errors = [error]
        if self.flipped:
            # The directory already points at the target; only the clean-up is left undone.
            await self.owner._update_move(self.move_id, errors=json.loads(json.dumps(errors)))
            return
        for step in (
            lambda: shard_db.set_membership(self.source_dsn, self.tenant_id, epoch, "active"),
            lambda: shard_db.purge_tenant(self.target_dsn, self.tenant_id),
            lambda: shard_db.delete_membership(self.target_dsn, self.tenant_id),
        ):
            try:
                if self.source_dsn and self.target_dsn:
                    await step()
            except Exception as exc:
                errors.append(f"roll-back step failed: {type(exc).__name__}: {exc}")
        block_ms = int((time.perf_counter() - self.blocked_at) * 1000) if self.blocked_at else 0
        await self.owner._update_move(
            self.move_id, phase="failed", errors=errors, rows_copied=self.rows_copied, write_block_ms=block_ms
        )
