"""gRPC servicer of the audit service: translates requests to use cases and rows to messages."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from typing import Any

import asyncpg
import grpc
from google.protobuf import duration_pb2

from crm.v1 import audit_pb2, audit_pb2_grpc, common_pb2, data_admin_pb2
from services.audit.adapters.owners import Owners
from services.audit.service_layer import compliance, operations, queries
from services.audit.service_layer.db import caller_tenant
from shared import protoconv
from shared.errors import invalid
from shared.events import OPERATION_NAMES, OPERATIONS

LEGAL_BASIS_NAMES = {
    audit_pb2.LEGAL_BASIS_CONSENT: "consent",
    audit_pb2.LEGAL_BASIS_CONTRACT: "contract",
    audit_pb2.LEGAL_BASIS_LEGAL_OBLIGATION: "legal_obligation",
    audit_pb2.LEGAL_BASIS_VITAL_INTERESTS: "vital_interests",
    audit_pb2.LEGAL_BASIS_PUBLIC_TASK: "public_task",
    audit_pb2.LEGAL_BASIS_LEGITIMATE_INTERESTS: "legitimate_interests",
}
LEGAL_BASES = {name: value for value, name in LEGAL_BASIS_NAMES.items()}
DELETION_METHOD_NAMES = {
    audit_pb2.DELETION_METHOD_SOFT_DELETE: "soft_delete",
    audit_pb2.DELETION_METHOD_HARD_DELETE: "hard_delete",
    audit_pb2.DELETION_METHOD_ANONYMIZE: "anonymize",
}
DELETION_METHODS = {name: value for value, name in DELETION_METHOD_NAMES.items()}


def _json_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def _time_or_none(message: Any, field: str) -> dt.datetime | None:
    return protoconv.from_timestamp(getattr(message, field)) if message.HasField(field) else None


def _duration(value: dt.timedelta | None) -> duration_pb2.Duration | None:
    if value is None:
        return None
    duration = duration_pb2.Duration()
    duration.FromTimedelta(value)
    return duration


def _timedelta(message: Any, field: str) -> dt.timedelta | None:
    if not message.HasField(field):
        return None
    duration: duration_pb2.Duration = getattr(message, field)
    if duration.seconds < 0 or duration.nanos < 0:
        raise invalid(field, "must not be negative")
    return duration.ToTimedelta()


def audit_log_message(row: dict[str, Any]) -> audit_pb2.AuditLog:
    return audit_pb2.AuditLog(
        id=str(row["id"]),
        tenant_id=str(row["tenant_id"]),
        table_name=row["table_name"],
        record_id=str(row["record_id"]),
        operation=OPERATIONS[row["operation"]],
        old_values_json=_json_text(row["old_values"]),
        new_values_json=_json_text(row["new_values"]),
        changed_fields=list(row["changed_fields"] or []),
        actor=common_pb2.Actor(
            user_id=_str(row["user_id"]),
            email=row["user_email"] or "",
            session_id=row["session_id"] or "",
            ip_address=_str(row["ip_address"]),
            user_agent=row["user_agent"] or "",
        ),
        request_id=row["request_id"] or "",
        api_endpoint=row["api_endpoint"] or "",
        change_time=protoconv.timestamp(row["changed_at"]),
        service=row["service"],
        record_version=row["record_version"],
        event_id=str(row["event_id"]),
    )


def field_change_message(row: dict[str, Any]) -> audit_pb2.FieldChange:
    return audit_pb2.FieldChange(
        field_name=row["field_name"],
        old_value=row["old_value"] or "",
        new_value=row["new_value"] or "",
        field_type=row["field_type"] or "",
        sensitive=row["is_sensitive"],
    )


def version_message(row: dict[str, Any]) -> audit_pb2.RecordVersion:
    return audit_pb2.RecordVersion(
        id=str(row["id"]),
        table_name=row["table_name"],
        record_id=str(row["record_id"]),
        version_number=row["version_number"],
        record_data_json=_json_text(row["record_data"]),
        operation=OPERATIONS[row["operation"]],
        created_by=_str(row["created_by"]),
        create_time=protoconv.timestamp(row["created_at"]),
        is_current=row["is_current"],
        service=row["service"],
    )


def auth_message(row: dict[str, Any]) -> audit_pb2.AuthAuditLog:
    return audit_pb2.AuthAuditLog(
        id=str(row["id"]),
        user_id=_str(row["user_id"]),
        email=row["email"] or "",
        event_type=row["event_type"],
        success=row["success"],
        failure_reason=row["failure_reason"] or "",
        ip_address=_str(row["ip_address"]),
        user_agent=row["user_agent"] or "",
        session_id=row["session_id"] or "",
        mfa_used=row["mfa_used"],
        location_country=row["location_country"] or "",
        location_city=row["location_city"] or "",
        create_time=protoconv.timestamp(row["created_at"]),
        event_id=str(row["event_id"]),
    )


def api_call_message(row: dict[str, Any]) -> audit_pb2.ApiAuditLog:
    return audit_pb2.ApiAuditLog(
        id=str(row["id"]),
        user_id=_str(row["user_id"]),
        api_key_id=_str(row["api_key_id"]),
        endpoint=row["endpoint"],
        http_method=row["http_method"],
        response_status=row["response_status"] or 0,
        status_code=row["status_code"] or "",
        request_size=row["request_size"] or 0,
        response_size=row["response_size"] or 0,
        response_time_ms=row["response_time_ms"] or 0,
        ip_address=_str(row["ip_address"]),
        user_agent=row["user_agent"] or "",
        request_id=row["request_id"] or "",
        error_message=row["error_message"] or "",
        create_time=protoconv.timestamp(row["created_at"]),
        event_id=str(row["event_id"]),
    )


def activity_message(row: dict[str, Any]) -> audit_pb2.ProcessingActivity:
    return audit_pb2.ProcessingActivity(
        id=str(row["id"]),
        activity_name=row["activity_name"],
        purpose=row["purpose"],
        legal_basis=LEGAL_BASES[row["legal_basis"]],
        data_categories=list(row["data_categories"]),
        data_subjects=list(row["data_subjects"]),
        recipients=list(row["recipients"]),
        retention_period=_duration(row["retention_period"]),
        cross_border_transfers=row["cross_border_transfers"],
        security_measures=list(row["security_measures"]),
        create_time=protoconv.timestamp(row["created_at"]),
        update_time=protoconv.timestamp(row["updated_at"]),
    )


def consent_message(row: dict[str, Any]) -> audit_pb2.ConsentRecord:
    return audit_pb2.ConsentRecord(
        id=str(row["id"]),
        contact_id=_str(row["contact_id"]),
        lead_id=_str(row["lead_id"]),
        consent_type=row["consent_type"],
        consent_given=row["consent_given"],
        consent_time=protoconv.timestamp(row["consent_date"]),
        consent_method=row["consent_method"] or "",
        consent_evidence_json=_json_text(row["consent_evidence"]),
        withdraw_time=protoconv.timestamp(row["withdrawn_date"]),
        withdrawal_method=row["withdrawal_method"] or "",
        ip_address=_str(row["ip_address"]),
        user_agent=row["user_agent"] or "",
    )


def policy_message(row: dict[str, Any]) -> audit_pb2.RetentionPolicy:
    return audit_pb2.RetentionPolicy(
        id=str(row["id"]),
        policy_name=row["policy_name"],
        table_name=row["table_name"],
        retention_period=_duration(row["retention_period"]),
        deletion_method=DELETION_METHODS[row["deletion_method"]],
        conditions_json=_json_text(row["conditions"]),
        active=row["is_active"],
        create_time=protoconv.timestamp(row["created_at"]),
        last_run_time=protoconv.timestamp(row["last_run_at"]),
    )


def deletion_message(row: dict[str, Any]) -> audit_pb2.DeletionLog:
    return audit_pb2.DeletionLog(
        id=str(row["id"]),
        table_name=row["table_name"],
        record_id=_str(row["record_id"]),
        deletion_reason=row["deletion_reason"] or "",
        deletion_method=row["deletion_method"],
        deleted_by=_str(row["deleted_by"]),
        delete_time=protoconv.timestamp(row["deleted_at"]),
        record_count=row["record_count"],
        summary_json=_json_text(row["summary"]),
    )


def sensitive_field_message(row: dict[str, Any]) -> audit_pb2.SensitiveField:
    return audit_pb2.SensitiveField(
        table_name=row["table_name"],
        field_name=row["field_name"],
        create_time=protoconv.timestamp(row["created_at"]),
    )


class AuditServicer(audit_pb2_grpc.AuditServiceServicer):
    def __init__(self, pool: Callable[[], asyncpg.Pool], owners: Owners) -> None:
        self._pool = pool
        self._owners = owners

    # --- audit log and history ---------------------------------------------------------------

    async def ListAuditLogs(
        self, request: audit_pb2.ListAuditLogsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListAuditLogsResponse:
        if request.operation and request.operation not in OPERATION_NAMES:
            raise invalid("operation", "is not a known operation")
        rows, next_token = await queries.list_audit_logs(
            self._pool(),
            queries.AuditLogQuery(
                page_size=request.page_size,
                page_token=request.page_token,
                table_name=request.table_name,
                record_id=request.record_id,
                user_id=request.user_id,
                operation=OPERATION_NAMES.get(request.operation, ""),
                start_time=_time_or_none(request, "start_time"),
                end_time=_time_or_none(request, "end_time"),
                include_archive=request.include_archive,
            ),
        )
        return audit_pb2.ListAuditLogsResponse(
            audit_logs=[audit_log_message(row) for row in rows], next_page_token=next_token
        )

    async def GetRecordHistory(
        self, request: audit_pb2.GetRecordHistoryRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetRecordHistoryResponse:
        entries, token = await queries.record_history(
            self._pool(),
            request.table_name,
            request.record_id,
            request.page_size,
            request.page_token,
            request.include_archive,
        )
        return audit_pb2.GetRecordHistoryResponse(
            entries=[
                audit_pb2.RecordHistoryEntry(
                    audit_log=audit_log_message(row), field_changes=[field_change_message(c) for c in changes]
                )
                for row, changes in entries
            ],
            next_page_token=token,
        )

    async def ListRecordVersions(
        self, request: audit_pb2.ListRecordVersionsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListRecordVersionsResponse:
        rows, token = await queries.list_record_versions(
            self._pool(), request.table_name, request.record_id, request.page_size, request.page_token
        )
        return audit_pb2.ListRecordVersionsResponse(
            record_versions=[version_message(row) for row in rows], next_page_token=token
        )

    async def GetRecordVersion(
        self, request: audit_pb2.GetRecordVersionRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.RecordVersion:
        row = await queries.get_record_version(
            self._pool(), request.table_name, request.record_id, request.version_number
        )
        return version_message(row)

    async def RestoreRecordVersion(
        self, request: audit_pb2.RestoreRecordVersionRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.RestoreRecordVersionResponse:
        restored = await operations.restore_record_version(
            self._pool(),
            self._owners,
            request.table_name,
            request.record_id,
            request.version_number,
            request.force,
        )
        return audit_pb2.RestoreRecordVersionResponse(
            table_name=restored.table_name,
            record_id=restored.record_id,
            restored_version=restored.restored_version,
            new_version=restored.new_version,
        )

    async def GetUserActivitySummary(
        self, request: audit_pb2.GetUserActivitySummaryRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GetUserActivitySummaryResponse:
        rows = await queries.user_activity_summary(
            self._pool(),
            request.user_id,
            _time_or_none(request, "start_time"),
            _time_or_none(request, "end_time"),
        )
        return audit_pb2.GetUserActivitySummaryResponse(
            activities=[
                audit_pb2.UserActivity(
                    table_name=row["table_name"],
                    operation=OPERATIONS[row["operation"]],
                    count=row["count"],
                    last_activity_time=protoconv.timestamp(row["last_activity"]),
                )
                for row in rows
            ]
        )

    async def ListAuthEvents(
        self, request: audit_pb2.ListAuthEventsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListAuthEventsResponse:
        rows, token = await queries.list_auth_events(
            self._pool(),
            queries.AuthQuery(
                page_size=request.page_size,
                page_token=request.page_token,
                failures_only=request.failures_only,
                user_id=request.user_id,
                event_type=request.event_type,
                start_time=_time_or_none(request, "start_time"),
                end_time=_time_or_none(request, "end_time"),
            ),
        )
        return audit_pb2.ListAuthEventsResponse(
            auth_events=[auth_message(r) for r in rows], next_page_token=token
        )

    async def ListApiCalls(
        self, request: audit_pb2.ListApiCallsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListApiCallsResponse:
        rows, token = await queries.list_api_calls(
            self._pool(),
            queries.ApiCallQuery(
                page_size=request.page_size,
                page_token=request.page_token,
                errors_only=request.errors_only,
                endpoint=request.endpoint,
                user_id=request.user_id,
                start_time=_time_or_none(request, "start_time"),
                end_time=_time_or_none(request, "end_time"),
            ),
        )
        return audit_pb2.ListApiCallsResponse(
            api_calls=[api_call_message(r) for r in rows], next_page_token=token
        )

    async def VerifyAuditChain(
        self, request: audit_pb2.VerifyAuditChainRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.VerifyAuditChainResponse:
        report = await queries.verify_chain(self._pool(), request.include_archive)
        return audit_pb2.VerifyAuditChainResponse(
            valid=report.valid,
            entries_checked=report.checked,
            first_broken_sequence=report.broken_sequence,
            first_broken_entry_id=report.broken_entry_id,
            reason=report.reason,
            head_sequence=report.head_sequence,
            head_hash=report.head_hash,
            erased_entries=report.erased,
        )

    # --- sensitive fields ------------------------------------------------------------------------

    async def CreateSensitiveField(
        self, request: audit_pb2.CreateSensitiveFieldRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.SensitiveField:
        row = await compliance.create_sensitive_field(
            self._pool(), request.sensitive_field.table_name, request.sensitive_field.field_name
        )
        return sensitive_field_message(row)

    async def ListSensitiveFields(
        self, request: audit_pb2.ListSensitiveFieldsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListSensitiveFieldsResponse:
        rows = await compliance.list_sensitive_fields(self._pool())
        return audit_pb2.ListSensitiveFieldsResponse(
            sensitive_fields=[sensitive_field_message(r) for r in rows]
        )

    async def DeleteSensitiveField(
        self, request: audit_pb2.DeleteSensitiveFieldRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.DeleteSensitiveFieldResponse:
        await compliance.delete_sensitive_field(self._pool(), request.table_name, request.field_name)
        return audit_pb2.DeleteSensitiveFieldResponse()

    # --- compliance ----------------------------------------------------------------------------

    async def CreateProcessingActivity(
        self, request: audit_pb2.CreateProcessingActivityRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ProcessingActivity:
        activity = request.processing_activity
        row = await compliance.create_processing_activity(
            self._pool(),
            compliance.ProcessingActivityInput(
                activity_name=activity.activity_name,
                purpose=activity.purpose,
                legal_basis=LEGAL_BASIS_NAMES.get(activity.legal_basis, ""),
                data_categories=list(activity.data_categories),
                data_subjects=list(activity.data_subjects),
                recipients=list(activity.recipients),
                retention_period=_timedelta(activity, "retention_period"),
                cross_border_transfers=activity.cross_border_transfers,
                security_measures=list(activity.security_measures),
            ),
        )
        return activity_message(row)

    async def ListProcessingActivities(
        self, request: audit_pb2.ListProcessingActivitiesRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListProcessingActivitiesResponse:
        rows, token = await compliance.list_processing_activities(
            self._pool(), request.page_size, request.page_token
        )
        return audit_pb2.ListProcessingActivitiesResponse(
            processing_activities=[activity_message(r) for r in rows], next_page_token=token
        )

    async def RecordConsent(
        self, request: audit_pb2.RecordConsentRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ConsentRecord:
        consent = request.consent_record
        row = await compliance.record_consent(
            self._pool(),
            compliance.ConsentInput(
                contact_id=consent.contact_id,
                lead_id=consent.lead_id,
                consent_type=consent.consent_type,
                consent_given=consent.consent_given,
                consent_time=_time_or_none(consent, "consent_time"),
                consent_method=consent.consent_method,
                consent_evidence_json=consent.consent_evidence_json,
                ip_address=consent.ip_address,
                user_agent=consent.user_agent,
            ),
        )
        return consent_message(row)

    async def WithdrawConsent(
        self, request: audit_pb2.WithdrawConsentRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ConsentRecord:
        row = await compliance.withdraw_consent(
            self._pool(), request.id, request.withdrawal_method, _time_or_none(request, "withdraw_time")
        )
        return consent_message(row)

    async def ListConsents(
        self, request: audit_pb2.ListConsentsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListConsentsResponse:
        rows, token = await compliance.list_consents(
            self._pool(),
            request.page_size,
            request.page_token,
            request.contact_id,
            request.lead_id,
            request.consent_type,
        )
        return audit_pb2.ListConsentsResponse(
            consent_records=[consent_message(r) for r in rows], next_page_token=token
        )

    async def CreateRetentionPolicy(
        self, request: audit_pb2.CreateRetentionPolicyRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.RetentionPolicy:
        policy = request.retention_policy
        row = await compliance.create_retention_policy(
            self._pool(),
            compliance.RetentionPolicyInput(
                policy_name=policy.policy_name,
                table_name=policy.table_name,
                retention_period=_timedelta(policy, "retention_period"),
                deletion_method=DELETION_METHOD_NAMES.get(policy.deletion_method, ""),
                conditions_json=policy.conditions_json,
                # proto3 bools default to false; a new policy is active unless it says otherwise
                # through a later update, so create always activates it.
                active=True,
            ),
        )
        return policy_message(row)

    async def ListRetentionPolicies(
        self, request: audit_pb2.ListRetentionPoliciesRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListRetentionPoliciesResponse:
        rows, token = await compliance.list_retention_policies(
            self._pool(), request.page_size, request.page_token
        )
        return audit_pb2.ListRetentionPoliciesResponse(
            retention_policies=[policy_message(r) for r in rows], next_page_token=token
        )

    async def RunRetention(
        self, request: audit_pb2.RunRetentionRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.RunRetentionResponse:
        results = await operations.run_retention(
            self._pool(), self._owners, caller_tenant(), request.policy_id
        )
        return audit_pb2.RunRetentionResponse(
            results=[
                audit_pb2.RetentionRunResult(
                    policy_id=r.policy_id,
                    table_name=r.table_name,
                    deletion_method=DELETION_METHODS[r.deletion_method],
                    affected_count=r.affected_count,
                    error=r.error,
                )
                for r in results
            ]
        )

    async def EraseDataSubject(
        self, request: audit_pb2.EraseDataSubjectRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.EraseDataSubjectResponse:
        erasure = await operations.erase_data_subject(
            self._pool(), self._owners, request.email, request.contact_id, request.lead_id, request.reason
        )
        return audit_pb2.EraseDataSubjectResponse(
            deletion_log_id=erasure.deletion_log_id,
            counts=[
                data_admin_pb2.TableCount(table_name=t, count=n) for t, n in sorted(erasure.counts.items())
            ],
            audit_entries_anonymized=erasure.audit_entries_anonymized,
            consents_removed=erasure.consents_removed,
            incomplete_services=erasure.incomplete_services,
        )

    async def ListDeletionLogs(
        self, request: audit_pb2.ListDeletionLogsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ListDeletionLogsResponse:
        rows, token = await compliance.list_deletion_logs(
            self._pool(), request.page_size, request.page_token, request.table_name
        )
        return audit_pb2.ListDeletionLogsResponse(
            deletion_logs=[deletion_message(r) for r in rows], next_page_token=token
        )

    async def GetGdprReport(
        self, request: audit_pb2.GetGdprReportRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.GdprReport:
        report = await operations.gdpr_report(self._pool(), self._owners)
        return audit_pb2.GdprReport(
            activities=[
                audit_pb2.GdprReportActivity(
                    processing_activity=activity_message(a.activity),
                    table_counts=[
                        data_admin_pb2.TableCount(table_name=t, count=n)
                        for t, n in sorted(a.table_counts.items())
                    ],
                    record_count=sum(a.table_counts.values()),
                )
                for a in report.activities
            ],
            active_consents=report.active_consents,
            withdrawn_consents=report.withdrawn_consents,
            deletion_log_entries=report.deletion_log_entries,
            uncounted_tables=report.uncounted_tables,
        )

    async def ArchiveAuditLogs(
        self, request: audit_pb2.ArchiveAuditLogsRequest, context: grpc.aio.ServicerContext
    ) -> audit_pb2.ArchiveAuditLogsResponse:
        operations.require_platform_admin()
        archived = await operations.archive_audit_logs(self._pool(), _time_or_none(request, "before"))
        return audit_pb2.ArchiveAuditLogsResponse(
            partitions=[audit_pb2.ArchivedPartition(name=n, row_count=c) for n, c in archived],
            archived_count=sum(c for _, c in archived),
        )
