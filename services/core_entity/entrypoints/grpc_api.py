"""gRPC servicers of the core-entity service: they translate messages to use-case calls and
rows back to messages, and nothing else. The six resources share one set of handlers driven by
their entity specs."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import Message

from crm.v1 import core_entity_pb2 as pb
from crm.v1 import core_entity_pb2_grpc as pb_grpc
from services.core_entity.domain import model
from services.core_entity.domain.model import EntitySpec
from services.core_entity.entrypoints import codec
from services.core_entity.service_layer.entities import CoreEntities, PipelineView
from services.core_entity.service_layer.listing import ListQuery
from shared.errors import FieldViolation, InvalidArgument

Context: TypeAlias = grpc.aio.ServicerContext


def require_id(value: str, field: str = "id") -> uuid.UUID:
    violations: list[FieldViolation] = []
    parsed = codec.parse_uuid(value.strip(), field, violations)
    if parsed is None:
        raise InvalidArgument(violations or [FieldViolation(field, "is required")])
    return parsed


def update_mask(paths: Sequence[str]) -> list[str] | None:
    """None (every writable field) for an empty mask or "*"."""
    listed = [p for p in paths if p]
    return None if not listed or listed == ["*"] else listed


class Resource:
    """The standard methods of one resource, shared by the servicers."""

    def __init__(self, entities: CoreEntities, spec: EntitySpec, message: type[Message], plural: str) -> None:
        self.entities = entities
        self.spec = spec
        self.message = message
        self.plural = plural

    async def render(self, row: dict[str, Any]) -> Message:
        types = await self.entities.custom_types(self.spec)
        return codec.render(self.spec, row, self.message(), types)

    async def create(self, resource: Message) -> Message:
        values, violations = codec.parse(self.spec, resource, self.spec.name)
        return await self.render(await self.entities.create(self.spec, values, violations))

    async def get(self, record_id: str) -> Message:
        return await self.render(await self.entities.get(self.spec, require_id(record_id)))

    async def list(self, request: Any, response: Message) -> Message:
        result = await self.entities.list_records(
            self.spec,
            ListQuery(
                page_size=request.page_size,
                page_token=request.page_token,
                filter=request.filter,
                order_by=request.order_by,
                show_deleted=request.show_deleted,
            ),
        )
        types = await self.entities.custom_types(self.spec)
        target = getattr(response, self.plural)
        for row in result.rows:
            codec.render(self.spec, row, target.add(), types)
        response.next_page_token = result.next_page_token  # type: ignore[attr-defined]
        response.total_size = result.total_size  # type: ignore[attr-defined]
        return response

    async def update(self, resource: Any, paths: Sequence[str]) -> Message:
        record_id = require_id(resource.id, f"{self.spec.name}.id")
        values, violations = codec.parse(self.spec, resource, self.spec.name, update_mask(paths))
        row = await self.entities.update(
            self.spec, record_id, values, violations, codec.parse_etag(resource.etag)
        )
        return await self.render(row)

    async def delete(self, request: Any) -> Message:
        row = await self.entities.delete(self.spec, require_id(request.id), codec.parse_etag(request.etag))
        return await self.render(row)

    async def undelete(self, request: Any) -> Message:
        return await self.render(await self.entities.undelete(self.spec, require_id(request.id)))


class AccountServicer(pb_grpc.AccountServiceServicer):
    def __init__(self, entities: CoreEntities) -> None:
        self._r = Resource(entities, model.ACCOUNT, pb.Account, "accounts")

    async def CreateAccount(self, request: pb.CreateAccountRequest, context: Context) -> Any:
        return await self._r.create(request.account)

    async def GetAccount(self, request: pb.GetAccountRequest, context: Context) -> Any:
        return await self._r.get(request.id)

    async def ListAccounts(self, request: pb.ListAccountsRequest, context: Context) -> Any:
        return await self._r.list(request, pb.ListAccountsResponse())

    async def UpdateAccount(self, request: pb.UpdateAccountRequest, context: Context) -> Any:
        return await self._r.update(request.account, request.update_mask.paths)

    async def DeleteAccount(self, request: pb.DeleteAccountRequest, context: Context) -> Any:
        return await self._r.delete(request)

    async def UndeleteAccount(self, request: pb.UndeleteAccountRequest, context: Context) -> Any:
        return await self._r.undelete(request)

    async def ListAccountHierarchy(
        self, request: pb.ListAccountHierarchyRequest, context: Context
    ) -> pb.ListAccountHierarchyResponse:
        found = await self._r.entities.hierarchy(require_id(request.id), request.max_depth)
        types = await self._r.entities.custom_types(model.ACCOUNT)
        response = pb.ListAccountHierarchyResponse()
        codec.render(model.ACCOUNT, found.account, response.account, types)
        for target, nodes in (
            (response.ancestors, found.ancestors),
            (response.descendants, found.descendants),
        ):
            for row, depth in nodes:
                node = target.add(depth=depth)
                codec.render(model.ACCOUNT, row, node.account, types)
        return response


class ContactServicer(pb_grpc.ContactServiceServicer):
    def __init__(self, entities: CoreEntities) -> None:
        self._r = Resource(entities, model.CONTACT, pb.Contact, "contacts")

    async def CreateContact(self, request: pb.CreateContactRequest, context: Context) -> Any:
        return await self._r.create(request.contact)

    async def GetContact(self, request: pb.GetContactRequest, context: Context) -> Any:
        return await self._r.get(request.id)

    async def ListContacts(self, request: pb.ListContactsRequest, context: Context) -> Any:
        return await self._r.list(request, pb.ListContactsResponse())

    async def UpdateContact(self, request: pb.UpdateContactRequest, context: Context) -> Any:
        return await self._r.update(request.contact, request.update_mask.paths)

    async def DeleteContact(self, request: pb.DeleteContactRequest, context: Context) -> Any:
        return await self._r.delete(request)

    async def UndeleteContact(self, request: pb.UndeleteContactRequest, context: Context) -> Any:
        return await self._r.undelete(request)


class LeadServicer(pb_grpc.LeadServiceServicer):
    def __init__(self, entities: CoreEntities) -> None:
        self._r = Resource(entities, model.LEAD, pb.Lead, "leads")

    async def CreateLead(self, request: pb.CreateLeadRequest, context: Context) -> Any:
        return await self._r.create(request.lead)

    async def GetLead(self, request: pb.GetLeadRequest, context: Context) -> Any:
        return await self._r.get(request.id)

    async def ListLeads(self, request: pb.ListLeadsRequest, context: Context) -> Any:
        return await self._r.list(request, pb.ListLeadsResponse())

    async def UpdateLead(self, request: pb.UpdateLeadRequest, context: Context) -> Any:
        return await self._r.update(request.lead, request.update_mask.paths)

    async def DeleteLead(self, request: pb.DeleteLeadRequest, context: Context) -> Any:
        return await self._r.delete(request)

    async def UndeleteLead(self, request: pb.UndeleteLeadRequest, context: Context) -> Any:
        return await self._r.undelete(request)

    async def ConvertLead(self, request: pb.ConvertLeadRequest, context: Context) -> pb.ConvertLeadResponse:
        entities = self._r.entities
        violations: list[FieldViolation] = []
        account_id = codec.parse_uuid(request.account_id.strip(), "account_id", violations)
        account_values: dict[str, Any] = {}
        if request.HasField("account"):
            account_values, bad = codec.parse(model.ACCOUNT, request.account, "account")
            violations += bad
        deal_values: dict[str, Any] = {}
        if request.HasField("deal"):
            deal_values, bad = codec.parse(model.DEAL, request.deal, "deal")
            violations += bad
        result = await entities.convert_lead(
            require_id(request.id),
            account_id=account_id,
            account_values=account_values,
            create_deal=request.create_deal,
            deal_values=deal_values,
            violations=violations,
            etag_version=codec.parse_etag(request.etag),
        )
        response = pb.ConvertLeadResponse()
        for spec, row, target in (
            (model.LEAD, result.lead, response.lead),
            (model.CONTACT, result.contact, response.contact),
            (model.ACCOUNT, result.account, response.account),
            (model.DEAL, result.deal, response.deal),
        ):
            if row is not None:
                codec.render(spec, row, target, await entities.custom_types(spec))
        return response


class DealServicer(pb_grpc.DealServiceServicer):
    def __init__(self, entities: CoreEntities) -> None:
        self._r = Resource(entities, model.DEAL, pb.Deal, "deals")

    async def CreateDeal(self, request: pb.CreateDealRequest, context: Context) -> Any:
        return await self._r.create(request.deal)

    async def GetDeal(self, request: pb.GetDealRequest, context: Context) -> Any:
        return await self._r.get(request.id)

    async def ListDeals(self, request: pb.ListDealsRequest, context: Context) -> Any:
        return await self._r.list(request, pb.ListDealsResponse())

    async def UpdateDeal(self, request: pb.UpdateDealRequest, context: Context) -> Any:
        return await self._r.update(request.deal, request.update_mask.paths)

    async def DeleteDeal(self, request: pb.DeleteDealRequest, context: Context) -> Any:
        return await self._r.delete(request)

    async def UndeleteDeal(self, request: pb.UndeleteDealRequest, context: Context) -> Any:
        return await self._r.undelete(request)

    async def MoveDealStage(self, request: pb.MoveDealStageRequest, context: Context) -> Any:
        violations: list[FieldViolation] = []
        close_date = (
            codec.parse_date(request.actual_close_date, "actual_close_date", violations)
            if request.HasField("actual_close_date")
            else None
        )
        if violations:
            raise InvalidArgument(violations)
        row = await self._r.entities.move_deal_stage(
            require_id(request.id),
            require_id(request.stage_id, "stage_id"),
            close_date,
            codec.parse_etag(request.etag),
        )
        return await self._r.render(row)

    async def ListSupportedCurrencies(
        self, request: pb.ListSupportedCurrenciesRequest, context: Context
    ) -> pb.ListSupportedCurrenciesResponse:
        return pb.ListSupportedCurrenciesResponse(currency_codes=await self._r.entities.list_currencies())

    async def SetSupportedCurrencies(
        self, request: pb.SetSupportedCurrenciesRequest, context: Context
    ) -> pb.SetSupportedCurrenciesResponse:
        codes = await self._r.entities.set_currencies(list(request.currency_codes))
        return pb.SetSupportedCurrenciesResponse(currency_codes=codes)


def pipeline_message(view: PipelineView, target: pb.Pipeline | None = None) -> pb.Pipeline:
    message = target if target is not None else pb.Pipeline()
    codec.render(model.PIPELINE, view.pipeline, message)
    for stage in view.stages:
        codec.render(model.STAGE, stage, message.stages.add())
    return message


class PipelineServicer(pb_grpc.PipelineServiceServicer):
    def __init__(self, entities: CoreEntities) -> None:
        self._entities = entities
        self._r = Resource(entities, model.PIPELINE, pb.Pipeline, "pipelines")

    async def _view(self, row: dict[str, Any]) -> pb.Pipeline:
        (view,) = await self._entities.pipeline_views([row])
        return pipeline_message(view)

    async def CreatePipeline(self, request: pb.CreatePipelineRequest, context: Context) -> pb.Pipeline:
        values, violations = codec.parse(model.PIPELINE, request.pipeline, "pipeline")
        stages = []
        for i, stage in enumerate(request.pipeline.stages):
            stage_values, bad = codec.parse(model.STAGE, stage, f"pipeline.stages[{i}]")
            stages.append(stage_values)
            violations += bad
        return pipeline_message(await self._entities.create_pipeline(values, stages, violations))

    async def GetPipeline(self, request: pb.GetPipelineRequest, context: Context) -> pb.Pipeline:
        return await self._view(await self._entities.get(model.PIPELINE, require_id(request.id)))

    async def ListPipelines(
        self, request: pb.ListPipelinesRequest, context: Context
    ) -> pb.ListPipelinesResponse:
        result = await self._entities.list_records(
            model.PIPELINE,
            ListQuery(
                request.page_size, request.page_token, request.filter, request.order_by, request.show_deleted
            ),
        )
        response = pb.ListPipelinesResponse(
            next_page_token=result.next_page_token, total_size=result.total_size
        )
        for view in await self._entities.pipeline_views(result.rows):
            pipeline_message(view, response.pipelines.add())
        return response

    async def UpdatePipeline(self, request: pb.UpdatePipelineRequest, context: Context) -> pb.Pipeline:
        paths = update_mask(request.update_mask.paths)
        if paths is not None and "stages" in paths:
            raise InvalidArgument(
                [FieldViolation("update_mask", "stages change through the pipeline stage calls")]
            )
        record_id = require_id(request.pipeline.id, "pipeline.id")
        values, violations = codec.parse(model.PIPELINE, request.pipeline, "pipeline", paths)
        row = await self._entities.update(
            model.PIPELINE, record_id, values, violations, codec.parse_etag(request.pipeline.etag)
        )
        return await self._view(row)

    async def DeletePipeline(self, request: pb.DeletePipelineRequest, context: Context) -> pb.Pipeline:
        row = await self._entities.delete(
            model.PIPELINE, require_id(request.id), codec.parse_etag(request.etag)
        )
        return await self._view(row)

    async def UndeletePipeline(self, request: pb.UndeletePipelineRequest, context: Context) -> pb.Pipeline:
        return await self._view(await self._entities.undelete(model.PIPELINE, require_id(request.id)))

    async def CreatePipelineStage(
        self, request: pb.CreatePipelineStageRequest, context: Context
    ) -> pb.PipelineStage:
        values, violations = codec.parse(model.STAGE, request.stage, "stage")
        row = await self._entities.create_stage(
            require_id(request.pipeline_id, "pipeline_id"), values, violations
        )
        return codec.render(model.STAGE, row, pb.PipelineStage())  # type: ignore[return-value]

    async def UpdatePipelineStage(
        self, request: pb.UpdatePipelineStageRequest, context: Context
    ) -> pb.PipelineStage:
        record_id = require_id(request.stage.id, "stage.id")
        values, violations = codec.parse(
            model.STAGE, request.stage, "stage", update_mask(request.update_mask.paths)
        )
        row = await self._entities.update_stage(
            record_id, values, violations, codec.parse_etag(request.stage.etag)
        )
        return codec.render(model.STAGE, row, pb.PipelineStage())  # type: ignore[return-value]

    async def DeletePipelineStage(
        self, request: pb.DeletePipelineStageRequest, context: Context
    ) -> pb.DeletePipelineStageResponse:
        view = await self._entities.delete_stage(require_id(request.id), codec.parse_etag(request.etag))
        return pb.DeletePipelineStageResponse(pipeline=pipeline_message(view))

    async def ReorderPipelineStages(
        self, request: pb.ReorderPipelineStagesRequest, context: Context
    ) -> pb.Pipeline:
        ids = [require_id(value, f"stage_ids[{i}]") for i, value in enumerate(request.stage_ids)]
        view = await self._entities.reorder_stages(require_id(request.pipeline_id, "pipeline_id"), ids)
        return pipeline_message(view)


class ActivityServicer(pb_grpc.ActivityServiceServicer):
    def __init__(self, entities: CoreEntities) -> None:
        self._r = Resource(entities, model.ACTIVITY, pb.Activity, "activities")

    async def CreateActivity(self, request: pb.CreateActivityRequest, context: Context) -> Any:
        return await self._r.create(request.activity)

    async def GetActivity(self, request: pb.GetActivityRequest, context: Context) -> Any:
        return await self._r.get(request.id)

    async def ListActivities(self, request: pb.ListActivitiesRequest, context: Context) -> Any:
        return await self._r.list(request, pb.ListActivitiesResponse())

    async def UpdateActivity(self, request: pb.UpdateActivityRequest, context: Context) -> Any:
        return await self._r.update(request.activity, request.update_mask.paths)

    async def DeleteActivity(self, request: pb.DeleteActivityRequest, context: Context) -> Any:
        return await self._r.delete(request)

    async def UndeleteActivity(self, request: pb.UndeleteActivityRequest, context: Context) -> Any:
        return await self._r.undelete(request)
