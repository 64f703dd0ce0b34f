"""`crm audit ...`, `crm gdpr ...` and `crm retention ...`: your tenant's audit log, record
history and versions, and its compliance registers (all through the gateway)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.client import API_KEY_OPTION, GATEWAY_OPTION, HOME_OPTION, call, gateway_address, print_message

audit_app = typer.Typer(
    help="The audit log, record history and versions of your tenant.", no_args_is_help=True
)
gdpr_app = typer.Typer(help="Consents, erasure and the GDPR report of your tenant.", no_args_is_help=True)
retention_app = typer.Typer(help="Retention policies of your tenant.", no_args_is_help=True)

OPERATIONS = {"insert": 1, "update": 2, "delete": 3, "restore": 4}
DELETION_METHODS = {"soft_delete": 1, "hard_delete": 2, "anonymize": 3}


def register(app: typer.Typer) -> None:
    app.add_typer(audit_app, name="audit")
    app.add_typer(gdpr_app, name="gdpr")
    app.add_typer(retention_app, name="retention")


def _audit(home: Path, gateway: str | None, key: str, method: str, request: Any) -> Any:
    from crm.v1 import audit_pb2_grpc

    return call(gateway_address(home, gateway), key, audit_pb2_grpc.AuditServiceStub, method, request)


def _stamp(value: dt.datetime | None) -> Any:
    if value is None:
        return None
    from google.protobuf import timestamp_pb2

    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value if value.tzinfo else value.replace(tzinfo=dt.UTC))
    return stamp


@audit_app.command("log")
def audit_log(
    key: API_KEY_OPTION,
    table: Annotated[str, typer.Option(help="Only this table.")] = "",
    record: Annotated[str, typer.Option(help="Only this record id.")] = "",
    user: Annotated[str, typer.Option(help="Only changes by this user id.")] = "",
    operation: Annotated[str, typer.Option(help="insert, update, delete or restore.")] = "",
    since: Annotated[dt.datetime | None, typer.Option(help="At or after this time (UTC).")] = None,
    until: Annotated[dt.datetime | None, typer.Option(help="Before this time (UTC).")] = None,
    archive: Annotated[bool, typer.Option("--archive", help="Include archived entries.")] = False,
    limit: Annotated[int, typer.Option()] = 50,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """List your tenant's audit entries, newest first."""
    from crm.v1 import audit_pb2

    if operation and operation.lower() not in OPERATIONS:
        raise typer.BadParameter("operation must be insert, update, delete or restore")
    request = audit_pb2.ListAuditLogsRequest(
        page_size=limit,
        table_name=table,
        record_id=record,
        user_id=user,
        operation=OPERATIONS.get(operation.lower(), 0),  # type: ignore[arg-type]
        start_time=_stamp(since),
        end_time=_stamp(until),
        include_archive=archive,
    )
    print_message(_audit(home, gateway, key, "ListAuditLogs", request))


@audit_app.command("history")
def audit_history(
    key: API_KEY_OPTION,
    table: Annotated[str, typer.Argument(help="The record's table, e.g. contacts.")],
    record: Annotated[str, typer.Argument(help="The record id.")],
    archive: Annotated[bool, typer.Option("--archive", help="Include archived entries.")] = False,
    limit: Annotated[int, typer.Option()] = 100,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """A record's audit trail, oldest first, with field-level changes."""
    from crm.v1 import audit_pb2

    request = audit_pb2.GetRecordHistoryRequest(
        table_name=table, record_id=record, page_size=limit, include_archive=archive
    )
    print_message(_audit(home, gateway, key, "GetRecordHistory", request))


@audit_app.command("versions")
def audit_versions(
    key: API_KEY_OPTION,
    table: Annotated[str, typer.Argument(help="The record's table.")],
    record: Annotated[str, typer.Argument(help="The record id.")],
    version: Annotated[int, typer.Option(help="Show this version only.")] = 0,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """A record's stored versions, newest first (or one of them)."""
    from crm.v1 import audit_pb2

    if version:
        request: Any = audit_pb2.GetRecordVersionRequest(
            table_name=table, record_id=record, version_number=version
        )
        print_message(_audit(home, gateway, key, "GetRecordVersion", request))
        return
    request = audit_pb2.ListRecordVersionsRequest(table_name=table, record_id=record, page_size=1000)
    print_message(_audit(home, gateway, key, "ListRecordVersions", request))


@audit_app.command("restore")
def audit_restore(
    key: API_KEY_OPTION,
    table: Annotated[str, typer.Argument(help="The record's table.")],
    record: Annotated[str, typer.Argument(help="The record id.")],
    version: Annotated[int, typer.Argument(help="The version to write back.")],
    force: Annotated[bool, typer.Option("--force", help="Even if the record changed since.")] = False,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Write an earlier version back through the owning service (logged as RESTORE)."""
    from crm.v1 import audit_pb2

    request = audit_pb2.RestoreRecordVersionRequest(
        table_name=table, record_id=record, version_number=version, force=force
    )
    print_message(_audit(home, gateway, key, "RestoreRecordVersion", request))


@audit_app.command("verify")
def audit_verify(
    key: API_KEY_OPTION,
    archive: Annotated[bool, typer.Option("--archive", help="Verify archived entries too.")] = False,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Recompute your audit log's hash chain; exits 2 when it is broken."""
    from crm.v1 import audit_pb2

    reply = _audit(
        home, gateway, key, "VerifyAuditChain", audit_pb2.VerifyAuditChainRequest(include_archive=archive)
    )
    print_message(reply)
    if not reply.valid:
        raise typer.Exit(2)


@audit_app.command("activity")
def audit_activity(
    key: API_KEY_OPTION,
    user: Annotated[str, typer.Argument(help="The user id.")],
    days: Annotated[int, typer.Option(help="Look back this many days.")] = 30,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """What a user changed, per table and operation."""
    from crm.v1 import audit_pb2

    now = dt.datetime.now(dt.UTC)
    request = audit_pb2.GetUserActivitySummaryRequest(
        user_id=user, start_time=_stamp(now - dt.timedelta(days=days)), end_time=_stamp(now)
    )
    print_message(_audit(home, gateway, key, "GetUserActivitySummary", request))


@audit_app.command("auth")
def audit_auth(
    key: API_KEY_OPTION,
    failures: Annotated[bool, typer.Option("--failures", help="Failed attempts only.")] = False,
    limit: Annotated[int, typer.Option()] = 50,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Sign-in events, newest first."""
    from crm.v1 import audit_pb2

    request = audit_pb2.ListAuthEventsRequest(page_size=limit, failures_only=failures)
    print_message(_audit(home, gateway, key, "ListAuthEvents", request))


@audit_app.command("api")
def audit_api(
    key: API_KEY_OPTION,
    errors: Annotated[bool, typer.Option("--errors", help="Failed calls only.")] = False,
    limit: Annotated[int, typer.Option()] = 50,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Calls made through the gateway, newest first."""
    from crm.v1 import audit_pb2

    request = audit_pb2.ListApiCallsRequest(page_size=limit, errors_only=errors)
    print_message(_audit(home, gateway, key, "ListApiCalls", request))


@gdpr_app.command("consent")
def gdpr_consent(
    key: API_KEY_OPTION,
    contact: Annotated[str, typer.Option(help="The contact id (or use --lead).")] = "",
    lead: Annotated[str, typer.Option(help="The lead id (or use --contact).")] = "",
    consent_type: Annotated[str, typer.Option("--type", help="Record a consent of this type.")] = "",
    refused: Annotated[bool, typer.Option("--refused", help="Record a refusal.")] = False,
    method: Annotated[str, typer.Option(help="How it was given or withdrawn.")] = "",
    withdraw: Annotated[str, typer.Option(help="Withdraw this consent id.")] = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Record (--type), withdraw (--withdraw) or list consents."""
    from crm.v1 import audit_pb2

    if withdraw:
        request: Any = audit_pb2.WithdrawConsentRequest(id=withdraw, withdrawal_method=method)
        print_message(_audit(home, gateway, key, "WithdrawConsent", request))
    elif consent_type:
        request = audit_pb2.RecordConsentRequest(
            consent_record=audit_pb2.ConsentRecord(
                contact_id=contact,
                lead_id=lead,
                consent_type=consent_type,
                consent_given=not refused,
                consent_method=method,
            )
        )
        print_message(_audit(home, gateway, key, "RecordConsent", request))
    else:
        request = audit_pb2.ListConsentsRequest(contact_id=contact, lead_id=lead, page_size=1000)
        print_message(_audit(home, gateway, key, "ListConsents", request))


@gdpr_app.command("erase")
def gdpr_erase(
    key: API_KEY_OPTION,
    email: Annotated[str, typer.Option(help="The person's e-mail address.")] = "",
    contact: Annotated[str, typer.Option(help="A contact id.")] = "",
    lead: Annotated[str, typer.Option(help="A lead id.")] = "",
    reason: Annotated[str, typer.Option(help="Why (no personal data).")] = "",
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Erase one person's data in every service and in audit values (cannot be undone)."""
    from crm.v1 import audit_pb2

    if not yes:
        typer.confirm("Erase this person's data everywhere? This cannot be undone", abort=True)
    request = audit_pb2.EraseDataSubjectRequest(email=email, contact_id=contact, lead_id=lead, reason=reason)
    print_message(_audit(home, gateway, key, "EraseDataSubject", request))


@gdpr_app.command("report")
def gdpr_report(
    key: API_KEY_OPTION, gateway: GATEWAY_OPTION = None, home: HOME_OPTION = Path(".crm")
) -> None:
    """Processing activities with the records they cover, consents and deletions."""
    from crm.v1 import audit_pb2

    print_message(_audit(home, gateway, key, "GetGdprReport", audit_pb2.GetGdprReportRequest()))


@retention_app.command("add")
def retention_add(
    key: API_KEY_OPTION,
    name: Annotated[str, typer.Option(help="The policy's name.")],
    table: Annotated[str, typer.Option(help="The table, e.g. leads.")],
    days: Annotated[int, typer.Option(help="Keep records this many days.")],
    method: Annotated[str, typer.Option(help="soft_delete, hard_delete or anonymize.")] = "soft_delete",
    conditions: Annotated[str, typer.Option(help='Extra conditions as JSON, e.g. {"status": "lost"}.')] = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Create a retention policy."""
    from google.protobuf import duration_pb2

    from crm.v1 import audit_pb2

    if method not in DELETION_METHODS:
        raise typer.BadParameter("method must be soft_delete, hard_delete or anonymize")
    request = audit_pb2.CreateRetentionPolicyRequest(
        retention_policy=audit_pb2.RetentionPolicy(
            policy_name=name,
            table_name=table,
            retention_period=duration_pb2.Duration(seconds=days * 86400),
            deletion_method=DELETION_METHODS[method],  # type: ignore[arg-type]
            conditions_json=conditions,
        )
    )
    print_message(_audit(home, gateway, key, "CreateRetentionPolicy", request))


@retention_app.command("run")
def retention_run(
    key: API_KEY_OPTION,
    policy: Annotated[str, typer.Option(help="Run only this policy id.")] = "",
    gateway: GATEWAY_OPTION = None,
    home: HOME_OPTION = Path(".crm"),
) -> None:
    """Run the retention policies now."""
    from crm.v1 import audit_pb2

    print_message(_audit(home, gateway, key, "RunRetention", audit_pb2.RunRetentionRequest(policy_id=policy)))


@retention_app.command("list")
def retention_list(
    key: API_KEY_OPTION, gateway: GATEWAY_OPTION = None, home: HOME_OPTION = Path(".crm")
) -> None:
    """List the retention policies."""
    from crm.v1 import audit_pb2

    request = audit_pb2.ListRetentionPoliciesRequest(page_size=1000)
    print_message(_audit(home, gateway, key, "ListRetentionPolicies", request))
