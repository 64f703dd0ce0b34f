# ruff: noqa: F811  (fixtures are imported from test_core_support, then used as arguments)
"""Accounts through the servicer on a real database: rules, hierarchy, etags, soft delete."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from crm.v1 import core_entity_pb2 as pb
from shared.db import asyncpg_dsn
from tests.integration.test_core_support import (  # noqa: F401
    CoreService,
    Tenant,
    channel,
    core_service,
    fails,
    other_tenant,
    tenant,
    violations,
)

pytestmark = pytest.mark.integration
INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def test_create_get_and_defaults(tenant: Tenant) -> None:
    created = await tenant.account(
        name="Acme",
        website="https://acme.example",
        annual_revenue="1234.50",
        employee_count=12,
        billing_address=pb.PostalAddress(city="Berlin", country="DE"),
    )
    assert created.account_type == "prospect"
    assert created.etag == 'W/"1"'
    assert created.created_by == tenant.user_id
    assert created.annual_revenue == "1234.50"
    got = await tenant.call(tenant.accounts, "GetAccount", pb.GetAccountRequest(id=created.id))
    assert got == created
    assert got.billing_address.city == "Berlin"


@pytest.mark.parametrize(
    ("fields", "bad"),
    [
        ({"name": "  "}, "account.name"),
        ({"website": "acme.example"}, "account.website"),
        ({"website": "ftp://acme.example"}, "account.website"),
        ({"annual_revenue": "-1"}, "account.annual_revenue"),
        ({"annual_revenue": "abc"}, "account.annual_revenue"),
        ({"annual_revenue": "1.234"}, "account.annual_revenue"),
        ({"employee_count": -5}, "account.employee_count"),
        ({"account_type": "friend"}, "account.account_type"),
        ({"phone": "call me"}, "account.phone"),
        ({"parent_account_id": "not-a-uuid"}, "account.parent_account_id"),
        ({"name": "x" * 256}, "account.name"),
    ],
)
async def test_bad_fields_are_named(tenant: Tenant, fields: dict[str, object], bad: str) -> None:
    error = await fails(INVALID, tenant.account(**fields))
    assert bad in violations(error)


async def test_every_bad_field_at_once(tenant: Tenant) -> None:
    error = await fails(INVALID, tenant.account(name="", website="nope", employee_count=-1, account_type="x"))
    assert set(violations(error)) == {
        "account.name",
        "account.website",
        "account.employee_count",
        "account.account_type",
    }


async def test_parent_of_another_tenant_is_not_found(tenant: Tenant, other_tenant: Tenant) -> None:
    theirs = await other_tenant.account(name="Secret Corp")
    error = await fails(grpc.StatusCode.NOT_FOUND, tenant.account(parent_account_id=theirs.id))
    assert "Secret Corp" not in (error.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tenant.call(tenant.accounts, "GetAccount", pb.GetAccountRequest(id=theirs.id))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_reparenting_an_ancestor_under_its_descendant_is_refused(tenant: Tenant) -> None:
    root = await tenant.account(name="Root")
    child = await tenant.account(name="Child", parent_account_id=root.id)
    grandchild = await tenant.account(name="Grandchild", parent_account_id=child.id)
    for parent in (grandchild.id, child.id):
        root.parent_account_id = parent
        error = await fails(
            grpc.StatusCode.FAILED_PRECONDITION,
            tenant.call(
                tenant.accounts,
                "UpdateAccount",
                pb.UpdateAccountRequest(
                    account=root, update_mask=field_mask_pb2.FieldMask(paths=["parent_account_id"])
                ),
            ),
        )
        assert "account.parent_account_id" in violations(error) or "account.parent_account_id" in (
            error.details() or ""
        )


async def test_own_parent_is_invalid(tenant: Tenant) -> None:
    account = await tenant.account()
    account.parent_account_id = account.id
    error = await fails(
        INVALID,
        tenant.call(
            tenant.accounts,
            "UpdateAccount",
            pb.UpdateAccountRequest(
                account=account, update_mask=field_mask_pb2.FieldMask(paths=["parent_account_id"])
            ),
        ),
    )
    assert "account.parent_account_id" in violations(error)


async def test_concurrent_reparenting_cannot_form_a_cycle(tenant: Tenant) -> None:
    a = await tenant.account(name="A")
    b = await tenant.account(name="B")

    async def set_parent(account: pb.Account, parent: str) -> grpc.StatusCode:
        account.parent_account_id = parent
        try:
            await tenant.call(
                tenant.accounts,
                "UpdateAccount",
                pb.UpdateAccountRequest(
                    account=account, update_mask=field_mask_pb2.FieldMask(paths=["parent_account_id"])
                ),
            )
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    results = await asyncio.gather(set_parent(a, b.id), set_parent(b, a.id))
    assert sorted(r.name for r in results) == ["FAILED_PRECONDITION", "OK"]


async def test_hierarchy_lists_ancestors_and_descendants(tenant: Tenant) -> None:
    root = await tenant.account(name="Root")
    mid = await tenant.account(name="Mid", parent_account_id=root.id)
    leaf_b = await tenant.account(name="B leaf", parent_account_id=mid.id)
    leaf_a = await tenant.account(name="A leaf", parent_account_id=mid.id)
    deeper = await tenant.account(name="Deeper", parent_account_id=leaf_a.id)
    found = await tenant.call(
        tenant.accounts, "ListAccountHierarchy", pb.ListAccountHierarchyRequest(id=mid.id)
    )
    assert found.account.id == mid.id
    assert [(n.account.id, n.depth) for n in found.ancestors] == [(root.id, -1)]
    assert [(n.account.id, n.depth) for n in found.descendants] == [
        (leaf_a.id, 1),
        (deeper.id, 2),
        (leaf_b.id, 1),
    ]


async def test_stale_etag_is_aborted_and_concurrent_updates_serialise(tenant: Tenant) -> None:
    account = await tenant.account(name="Before")
    first, second = pb.Account(), pb.Account()
    first.CopyFrom(account)
    second.CopyFrom(account)
    first.name, second.name = "First", "Second"
    mask = field_mask_pb2.FieldMask(paths=["name"])

    async def update(message: pb.Account) -> grpc.StatusCode:
        try:
            await tenant.call(
                tenant.accounts, "UpdateAccount", pb.UpdateAccountRequest(account=message, update_mask=mask)
            )
            return grpc.StatusCode.OK
        except grpc.aio.AioRpcError as exc:
            return exc.code()

    results = await asyncio.gather(update(first), update(second))
    assert sorted(r.name for r in results) == ["ABORTED", "OK"]
    now = await tenant.call(tenant.accounts, "GetAccount", pb.GetAccountRequest(id=account.id))
    assert now.etag == 'W/"2"' and now.name in ("First", "Second")


async def test_update_mask_only_changes_named_fields(tenant: Tenant) -> None:
    account = await tenant.account(name="Keep", industry="Software")
    change = pb.Account(id=account.id, name="Renamed", industry="")
    updated = await tenant.call(
        tenant.accounts,
        "UpdateAccount",
        pb.UpdateAccountRequest(account=change, update_mask=field_mask_pb2.FieldMask(paths=["name"])),
    )
    assert updated.name == "Renamed" and updated.industry == "Software"
    error = await fails(
        INVALID,
        tenant.call(
            tenant.accounts,
            "UpdateAccount",
            pb.UpdateAccountRequest(
                account=change, update_mask=field_mask_pb2.FieldMask(paths=["created_by"])
            ),
        ),
    )
    assert "update_mask" in violations(error)


async def test_soft_delete_hides_and_undelete_restores_with_activities(tenant: Tenant) -> None:
    account = await tenant.account()
    contact = await tenant.contact(account_id=account.id)
    activity = await tenant.call(
        tenant.activities,
        "CreateActivity",
        pb.CreateActivityRequest(
            activity=pb.Activity(subject="Call", activity_type="call", account_id=account.id)
        ),
    )
    deleted = await tenant.call(tenant.accounts, "DeleteAccount", pb.DeleteAccountRequest(id=account.id))
    assert deleted.HasField("delete_time")
    await fails(
        grpc.StatusCode.NOT_FOUND,
        tenant.call(tenant.accounts, "GetAccount", pb.GetAccountRequest(id=account.id)),
    )
    await fails(
        grpc.StatusCode.NOT_FOUND,
        tenant.call(tenant.activities, "GetActivity", pb.GetActivityRequest(id=activity.id)),
    )
    # Contacts keep living.
    kept = await tenant.call(tenant.contacts, "GetContact", pb.GetContactRequest(id=contact.id))
    assert kept.id == contact.id
    listed = await tenant.call(tenant.accounts, "ListAccounts", pb.ListAccountsRequest())
    assert account.id not in [a.id for a in listed.accounts]
    shown = await tenant.call(tenant.accounts, "ListAccounts", pb.ListAccountsRequest(show_deleted=True))
    assert account.id in [a.id for a in shown.accounts]
    restored = await tenant.call(tenant.accounts, "UndeleteAccount", pb.UndeleteAccountRequest(id=account.id))
    assert not restored.HasField("delete_time")
    again = await tenant.call(tenant.activities, "GetActivity", pb.GetActivityRequest(id=activity.id))
    assert again.id == activity.id


async def test_delete_with_stale_etag_is_aborted(tenant: Tenant) -> None:
    account = await tenant.account()
    await fails(
        grpc.StatusCode.ABORTED,
        tenant.call(tenant.accounts, "DeleteAccount", pb.DeleteAccountRequest(id=account.id, etag='W/"7"')),
    )


async def test_undelete_after_the_retention_window_is_not_found(
    core_service: CoreService, tenant: Tenant
) -> None:
    account = await tenant.account()
    await tenant.call(tenant.accounts, "DeleteAccount", pb.DeleteAccountRequest(id=account.id))
    conn = await asyncpg.connect(asyncpg_dsn(core_service.owner_dsn))
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", tenant.id)
            await conn.execute(
                "UPDATE core.accounts SET deleted_at = now() - interval '31 days' WHERE id = $1",
                uuid.UUID(account.id),
            )
    finally:
        await conn.close()
    await fails(
        grpc.StatusCode.NOT_FOUND,
        tenant.call(tenant.accounts, "UndeleteAccount", pb.UndeleteAccountRequest(id=account.id)),
    )


async def test_undelete_of_a_live_record_is_a_precondition(tenant: Tenant) -> None:
    account = await tenant.account()
    await fails(
        grpc.StatusCode.FAILED_PRECONDITION,
        tenant.call(tenant.accounts, "UndeleteAccount", pb.UndeleteAccountRequest(id=account.id)),
    )


async def test_hierarchy_depth_is_limited_and_other_tenants_not_found(
    tenant: Tenant, other_tenant: Tenant
) -> None:
    parent = await tenant.account(name="L0")
    chain = [parent]
    for level in range(1, 4):
        chain.append(await tenant.account(name=f"L{level}", parent_account_id=chain[-1].id))
    found = await tenant.call(
        tenant.accounts, "ListAccountHierarchy", pb.ListAccountHierarchyRequest(id=parent.id, max_depth=2)
    )
    assert [n.depth for n in found.descendants] == [1, 2]
    await fails(
        grpc.StatusCode.NOT_FOUND,
        other_tenant.call(
            other_tenant.accounts, "ListAccountHierarchy", pb.ListAccountHierarchyRequest(id=parent.id)
        ),
    )
