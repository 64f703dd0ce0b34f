"""What every workload in the Kubernetes base must have: native gRPC probes, requests and
limits, a non-root and read-only pod, its service's image, a Service, a PodDisruptionBudget, a
migration Job where it owns a schema, and NetworkPolicies that admit only the gateway and the
sibling backends."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.deploy.deploy_support import (
    BACKENDS,
    BASE,
    GRPC_PORT,
    METRICS_PORT,
    SERVICES,
    SHARDED,
    container_env,
    kind,
    pod_labels,
    pod_spec,
    render_kustomization,
    selects,
    workload_service,
)

pytestmark = pytest.mark.unit

BASE_DOCS = render_kustomization(BASE)
DEPLOYMENTS = kind(BASE_DOCS, "Deployment")
JOBS = kind(BASE_DOCS, "Job")
SHARD_DIRS = sorted((BASE / "shards").iterdir())
SHARDS = [d.name for d in SHARD_DIRS]


def _name(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["name"])


def _main_container(workload: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(workload)["containers"]
    assert len(containers) == 1, f"{_name(workload)}: one container per pod"
    container: dict[str, Any] = containers[0]
    return container


def test_every_service_has_a_deployment() -> None:
    services = {workload_service(d) for d in DEPLOYMENTS}
    assert services == set(SERVICES)
    for service in ("tenant", "audit", "gateway"):
        assert [_name(d) for d in DEPLOYMENTS if workload_service(d) == service] == [service]


def test_one_deployment_per_shard_for_sharded_services() -> None:
    assert SHARDS == ["shard-0", "shard-1"]
    for service in SHARDED:
        names = sorted(_name(d) for d in DEPLOYMENTS if workload_service(d) == service)
        assert names == [f"{service}-{shard}" for shard in SHARDS]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_name)
def test_deployment_has_native_grpc_probes(deployment: dict[str, Any]) -> None:
    container = _main_container(deployment)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe in container, f"{_name(deployment)} has no {probe}"
        assert container[probe]["grpc"]["port"] == GRPC_PORT, f"{_name(deployment)}: {probe} is not gRPC"


@pytest.mark.parametrize("workload", DEPLOYMENTS + JOBS, ids=_name)
def test_workload_has_requests_and_limits(workload: dict[str, Any]) -> None:
    resources = _main_container(workload)["resources"]
    for section in ("requests", "limits"):
        assert set(resources[section]) >= {"cpu", "memory"}, f"{_name(workload)}: {section} incomplete"


@pytest.mark.parametrize("workload", DEPLOYMENTS + JOBS, ids=_name)
def test_workload_runs_unprivileged(workload: dict[str, Any]) -> None:
    spec = pod_spec(workload)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] >= 10000
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    context = _main_container(workload)["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_name)
def test_deployment_runs_its_service_image_unchanged(deployment: dict[str, Any]) -> None:
    container = _main_container(deployment)
    service = workload_service(deployment)
    image, _, tag = container["image"].partition(":")
    assert image == f"crm-{service}", f"{_name(deployment)} runs {container['image']}"
    assert tag and tag != "latest"
    # The image's own command (`crm serve <service>`) runs: no override.
    assert "command" not in container and "args" not in container


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_name)
def test_deployment_declares_grpc_and_metrics_ports(deployment: dict[str, Any], config_maps: Any) -> None:
    container = _main_container(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    env = container_env(container, config_maps)
    assert env["CRM_PORT"] == str(GRPC_PORT)
    assert env["CRM_METRICS_PORT"] == str(METRICS_PORT)
    assert env["CRM_LISTEN_HOST"] == "0.0.0.0"
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_name)
def test_deployment_selector_matches_its_pods(deployment: dict[str, Any]) -> None:
    assert selects(deployment["spec"]["selector"], pod_labels(deployment))
    for other in DEPLOYMENTS:
        if other is not deployment:
            assert not selects(deployment["spec"]["selector"], pod_labels(other))


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_name)
def test_deployment_has_a_pod_disruption_budget(deployment: dict[str, Any]) -> None:
    budgets = [
        b
        for b in kind(BASE_DOCS, "PodDisruptionBudget")
        if selects(b["spec"]["selector"], pod_labels(deployment))
    ]
    assert len(budgets) == 1, f"{_name(deployment)} has {len(budgets)} PodDisruptionBudgets"
    replicas = deployment["spec"].get("replicas")
    if replicas is not None:
        assert replicas > budgets[0]["spec"]["minAvailable"], "a drain could never evict a pod"


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=_name)
def test_deployment_has_a_service_on_the_grpc_port(deployment: dict[str, Any]) -> None:
    services = [
        s
        for s in kind(BASE_DOCS, "Service")
        if selects({"matchLabels": s["spec"]["selector"]}, pod_labels(deployment))
    ]
    assert [_name(s) for s in services] == [_name(deployment)]
    (port,) = services[0]["spec"]["ports"]
    assert port["targetPort"] == "grpc"


def test_only_the_gateway_is_exposed() -> None:
    assert not kind(BASE_DOCS, "Ingress")
    for service in kind(BASE_DOCS, "Service"):
        spec = service["spec"]
        assert "externalIPs" not in spec
        if _name(service) == "gateway":
            assert spec["type"] == "LoadBalancer"
        else:
            assert spec.get("type", "ClusterIP") == "ClusterIP", f"{_name(service)} is exposed"
            assert spec["clusterIP"] == "None", f"{_name(service)}: backends are headless for gRPC balancing"


def test_gateway_scales_horizontally() -> None:
    (hpa,) = kind(BASE_DOCS, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    (gateway,) = [d for d in DEPLOYMENTS if _name(d) == "gateway"]
    assert "replicas" not in gateway["spec"], "the HorizontalPodAutoscaler owns the gateway's replica count"


@pytest.mark.parametrize("deployment", [d for d in DEPLOYMENTS if workload_service(d) in BACKENDS], ids=_name)
def test_backend_has_a_migration_job_with_the_same_image_and_settings(
    deployment: dict[str, Any], config_maps: Any
) -> None:
    service = workload_service(deployment)
    jobs = [j for j in JOBS if _name(j) == f"{_name(deployment)}-migrate"]
    assert len(jobs) == 1, f"no migration Job for {_name(deployment)}"
    job_container, container = _main_container(jobs[0]), _main_container(deployment)
    assert job_container["command"] == ["crm", "migrate", service]
    assert job_container["image"] == container["image"]
    assert job_container["envFrom"] == container["envFrom"]
    assert job_container["env"] == container["env"]
    assert pod_spec(jobs[0])["restartPolicy"] in {"Never", "OnFailure"}
    # Migrations run as Jobs, so the pods do not migrate on start.
    assert container_env(container, config_maps)["CRM_MIGRATE_ON_START"] == "false"


def test_no_job_without_a_deployment() -> None:
    names = {_name(d) for d in DEPLOYMENTS}
    for job in JOBS:
        assert _name(job).removesuffix("-migrate") in names


@pytest.mark.parametrize("shard", SHARDS)
def test_shard_has_its_database_and_backends(shard: str, config_maps: Any) -> None:
    shard_docs = render_kustomization(BASE / "shards" / shard)
    (cluster,) = kind(shard_docs, "Cluster")
    assert _name(cluster) == f"crm-{shard}-db"
    assert cluster["spec"]["instances"] >= 3
    assert cluster["spec"]["bootstrap"]["initdb"]["owner"] == "crm_owner"
    (app_role,) = cluster["spec"]["managed"]["roles"]
    assert app_role["name"] == "crm_app" and app_role["superuser"] is False and app_role["bypassrls"] is False
    for service in SHARDED:
        (deployment,) = [d for d in kind(shard_docs, "Deployment") if workload_service(d) == service]
        env = container_env(_main_container(deployment), config_maps)
        assert env["CRM_SHARD_NAME"] == shard
        assert f"@crm-{shard}-db-rw:5432/" in str(env["CRM_DB_URL"])
    (backup,) = kind(shard_docs, "ScheduledBackup")
    assert backup["spec"]["cluster"]["name"] == _name(cluster)


@pytest.mark.parametrize("shard", SHARDS)
def test_shard_backends_know_their_siblings(shard: str, config_maps: Any) -> None:
    for service in SHARDED:
        data = config_maps[f"{service}-{shard}"]
        assert data["CRM_CORE_ENTITY_ADDRESS"] == f"core-entity-{shard}:{GRPC_PORT}"
        assert data["CRM_CUSTOM_OBJECT_ADDRESS"] == f"custom-object-{shard}:{GRPC_PORT}"


def test_every_database_is_a_cloudnativepg_cluster_with_backups() -> None:
    clusters = {_name(c) for c in kind(BASE_DOCS, "Cluster")}
    assert clusters == {"crm-directory-db", "crm-audit-db"} | {f"crm-{shard}-db" for shard in SHARDS}
    backed_up = {b["spec"]["cluster"]["name"] for b in kind(BASE_DOCS, "ScheduledBackup")}
    assert backed_up == clusters
    for cluster in kind(BASE_DOCS, "Cluster"):
        (plugin,) = cluster["spec"]["plugins"]
        assert plugin["isWALArchiver"] is True


def test_shard_directories_differ_only_in_the_shard_name() -> None:
    reference = SHARD_DIRS[0]
    for directory in SHARD_DIRS[1:]:
        assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in reference.iterdir())
        for path in reference.iterdir():
            expected = path.read_text().replace(reference.name, directory.name)
            assert (directory / path.name).read_text() == expected, f"{directory.name}/{path.name} drifted"


def test_bootstrap_shards_name_the_shard_services(config_maps: Any) -> None:
    shards = json.loads(config_maps["tenant"]["CRM_BOOTSTRAP_SHARDS"])
    assert [s["name"] for s in shards] == SHARDS
    services = {_name(s) for s in kind(BASE_DOCS, "Service")}
    for entry in shards:
        for key, service in (
            ("core_entity_address", "core-entity"),
            ("custom_object_address", "custom-object"),
        ):
            host, _, port = entry[key].partition(":")
            assert host == f"{service}-{entry['name']}" and host in services
            assert port == str(GRPC_PORT)


def test_gateway_reaches_tenant_and_audit_services(config_maps: Any) -> None:
    assert config_maps["gateway"]["CRM_TENANT_ADDRESS"] == f"tenant:{GRPC_PORT}"
    assert config_maps["gateway"]["CRM_AUDIT_ADDRESS"] == f"audit:{GRPC_PORT}"


def _policies_for(labels: dict[str, str], policy_type: str) -> list[dict[str, Any]]:
    return [
        p
        for p in kind(BASE_DOCS, "NetworkPolicy")
        if policy_type in p["spec"]["policyTypes"] and selects(p["spec"]["podSelector"], labels)
    ]


@pytest.mark.parametrize("workload", DEPLOYMENTS + JOBS, ids=_name)
def test_default_deny_covers_every_workload(workload: dict[str, Any]) -> None:
    (deny,) = [p for p in kind(BASE_DOCS, "NetworkPolicy") if _name(p) == "crm-default-deny"]
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    assert set(deny["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert selects(deny["spec"]["podSelector"], pod_labels(workload))


@pytest.mark.parametrize("deployment", [d for d in DEPLOYMENTS if workload_service(d) in BACKENDS], ids=_name)
def test_backend_accepts_calls_only_from_gateway_and_siblings(deployment: dict[str, Any]) -> None:
    policies = _policies_for(pod_labels(deployment), "Ingress")
    assert policies, f"no ingress NetworkPolicy selects {_name(deployment)}"
    allowed_components = {"gateway", "backend"}
    grpc_rule_found = False
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = {p["port"] for p in rule["ports"]}
            assert "from" in rule, f"{_name(policy)} admits anyone"
            for peer in rule["from"]:
                if ports == {GRPC_PORT}:
                    assert set(peer) == {"podSelector"}, f"{_name(policy)}: gRPC from outside the namespace"
                    labels = peer["podSelector"]["matchLabels"]
                    assert labels["app.kubernetes.io/part-of"] == "crm-platform"
                    assert labels["app.kubernetes.io/component"] in allowed_components
                    grpc_rule_found = True
                else:
                    assert ports == {METRICS_PORT}, f"{_name(policy)} opens {ports}"
                    assert peer == {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}
                    }
    assert grpc_rule_found


@pytest.mark.parametrize(
    "workload", [w for w in DEPLOYMENTS + JOBS if workload_service(w) in BACKENDS], ids=_name
)
def test_backend_reaches_its_own_database_only(workload: dict[str, Any], config_maps: Any) -> None:
    env = container_env(_main_container(workload), config_maps)
    host = str(env["CRM_DB_URL"]).split("@", 1)[1].split(":", 1)[0]
    cluster = host.removesuffix("-rw")
    targets = set()
    for policy in _policies_for(pod_labels(workload), "Egress"):
        for rule in policy["spec"].get("egress", []):
            if {p["port"] for p in rule["ports"]} == {5432}:
                targets |= {peer["podSelector"]["matchLabels"]["cnpg.io/cluster"] for peer in rule["to"]}
    assert targets == {cluster}


def test_gateway_is_reachable_from_outside() -> None:
    (gateway,) = [d for d in DEPLOYMENTS if _name(d) == "gateway"]
    rules = [r for p in _policies_for(pod_labels(gateway), "Ingress") for r in p["spec"].get("ingress", [])]
    assert any("from" not in r and [p["port"] for p in r["ports"]] == [GRPC_PORT] for r in rules)


def test_service_account_mounts_no_token() -> None:
    (account,) = kind(BASE_DOCS, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    for workload in DEPLOYMENTS + JOBS:
        assert pod_spec(workload)["serviceAccountName"] == _name(account)
