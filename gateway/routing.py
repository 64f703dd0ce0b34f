"""The method table: for every RPC of the suite, which backend serves it, its streaming shape,
and who may call it. Built from the generated descriptors, so a new RPC is routed as soon as
its proto is compiled."""

from __future__ import annotations

import enum
import importlib
import pkgutil
from dataclasses import dataclass

from google.protobuf.descriptor import FileDescriptor

import crm.v1


class Backend(enum.StrEnum):
    TENANT = "tenant"
    AUDIT = "audit"
    CORE_ENTITY = "core_entity"
    CUSTOM_OBJECT = "custom_object"


class Access(enum.StrEnum):
    TENANT = "tenant"  # a tenant credential; routed with that tenant's context
    PLATFORM = "platform"  # the platform admin credential only
    EITHER = "either"  # platform admin, or a tenant acting on itself
    PUBLIC = "public"  # no credential: signing in is how a client gets one


SERVICE_BACKENDS: dict[str, Backend] = {
    "crm.v1.TenantService": Backend.TENANT,
    "crm.v1.AuditService": Backend.AUDIT,
    "crm.v1.AccountService": Backend.CORE_ENTITY,
    "crm.v1.ContactService": Backend.CORE_ENTITY,
    "crm.v1.LeadService": Backend.CORE_ENTITY,
    "crm.v1.DealService": Backend.CORE_ENTITY,
    "crm.v1.PipelineService": Backend.CORE_ENTITY,
    "crm.v1.ActivityService": Backend.CORE_ENTITY,
    "crm.v1.ImportService": Backend.CORE_ENTITY,
    "crm.v1.CustomObjectService": Backend.CUSTOM_OBJECT,
}

# Internal services the gateway itself calls; never reachable from outside.
INTERNAL_SERVICES = frozenset({"crm.v1.DirectoryService", "crm.v1.DataAdminService"})

PLATFORM_METHODS = frozenset(
    {
        "CreateTenant",
        "ListTenants",
        "UpdateTenant",
        "DeleteTenant",
        "CreateShard",
        "ListShards",
        "UpdateShard",
        "MoveTenant",
        "GetTenantMove",
        "SetSystemMetadata",
        # Archiving detaches whole partitions, which hold every tenant's entries.
        "ArchiveAuditLogs",
    }
)
EITHER_METHODS = frozenset({"GetTenant", "ListSystemMetadata"})
PUBLIC_METHODS = frozenset({"Authenticate"})


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    service: str
    method: str
    backend: Backend
    access: Access
    request_streaming: bool
    response_streaming: bool


def _proto_files() -> list[FileDescriptor]:
    files = []
    for module_info in pkgutil.iter_modules(crm.v1.__path__):
        if module_info.name.endswith("_pb2"):
            module = importlib.import_module(f"crm.v1.{module_info.name}")
            files.append(module.DESCRIPTOR)
    return files


def service_names() -> list[str]:
    """Every public service of the suite, for the gateway's reflection."""
    return sorted(
        service.full_name
        for file in _proto_files()
        for service in file.services_by_name.values()
        if service.full_name not in INTERNAL_SERVICES
    )


def build_routes() -> dict[str, Route]:
    routes: dict[str, Route] = {}
    for file in _proto_files():
        for service in file.services_by_name.values():
            backend = SERVICE_BACKENDS.get(service.full_name)
            if backend is None:
                continue
            for method in service.methods:
                access = (
                    Access.PUBLIC
                    if backend is Backend.TENANT and method.name in PUBLIC_METHODS
                    else Access.PLATFORM
                    if method.name in PLATFORM_METHODS
                    else Access.EITHER
                    if backend is Backend.TENANT and method.name in EITHER_METHODS
                    else Access.TENANT
                )
                path = f"/{service.full_name}/{method.name}"
                routes[path] = Route(
                    path=path,
                    service=service.full_name,
                    method=method.name,
                    backend=backend,
                    access=access,
                    request_streaming=method.client_streaming,
                    response_streaming=method.server_streaming,
                )
    return routes
