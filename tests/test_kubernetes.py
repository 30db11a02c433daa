"""deploy/kubernetes: the manifests validate against Kubernetes' own schemas (offline), pass a security linter, and
say only what the services understand: every variable, argument, port and Consul name in them is checked against
the code that reads it (the settings declarations, the CLI's parser, the intentions of the request path).
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest
import yaml

from services.common.config import ConfigError, ServiceConfig, config_from_args, declared, lmesh_cache, lmesh_home
from services.common.connect import MESH_CALLS
from services.common.peers import OPERATOR, PEER_SERVICES
from tests.harness import ROOT

MANIFEST = ROOT / "deploy" / "kubernetes" / "lmesh.yaml"
CONSUL_VALUES = ROOT / "deploy" / "kubernetes" / "consul-values.yaml"
# A version kubernetes-validate bundles schemas for; the manifests use nothing newer (grpc probes: 1.27).
KUBERNETES_VERSION = "1.32.0"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# What the kubelet gives fieldRef variables and Secrets give secretKeyRef ones, for starting a config here.
FIELD_VALUES = {"status.hostIP": "10.0.0.1", "status.podIP": "10.1.0.7"}
SECRET_VALUE = "secret-from-test"
# Variables the manifests may set beyond the services' settings: read by code that is no `setting()` (checked in
# test_the_variables_read_outside_the_settings_are_read), by the OpenTelemetry SDK (OTEL_*), or by the manifest
# itself (HOST_IP, only to build CONSUL_HTTP_ADDR from it).
READ_OUTSIDE_SETTINGS = frozenset({"LMESH_HOME", "LMESH_CACHE", "CONSUL_HTTP_TOKEN"})
MANIFEST_ONLY = frozenset({"HOST_IP"})
# The keys of the Secrets the manifests mount (README.md here: `kubectl create secret tls` makes tls.crt, tls.key).
SECRET_KEYS = {"lmesh-gateway-tls": ("tls.crt", "tls.key"), "lmesh-gateway-client-ca": ("ca.crt",)}
# Operators' pods (the CLI's mesh identity lmesh-operator) carry this label.
OPERATOR_LABEL = ("lmesh-role", "operator")
CONSUL_AGENTS = {"namespace": "consul", "labels": {"app": "consul", "component": "client"}}
PROMETHEUS = {"namespace": "monitoring", "labels": {"app.kubernetes.io/name": "prometheus"}}
# checkov's findings the manifests skip on purpose, each with its reason in a checkov.io/skip annotation.
CHECKOV_SKIPS = frozenset({
    "CKV_K8S_35",  # LMESH_ADMIN_TOKEN and CONSUL_HTTP_TOKEN: read from the environment only, never a file
    "CKV_K8S_43",  # a locally built image pinned by tag; a digest exists only once it is published
    "CKV_K8S_15",  # imagePullPolicy Always would pull a locally built image from Docker Hub
})


def documents(path: Path = MANIFEST) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def of_kind(docs: list[dict[str, Any]], *kinds: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] in kinds]


def workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The Deployments and StatefulSets by the service they run (`serve SERVICE` in their one container)."""
    found = {}
    for doc in of_kind(docs, *WORKLOAD_KINDS):
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] == "serve", doc["metadata"]["name"]
        found[container["args"][1]] = doc
    return found


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def container_of(workload: dict[str, Any]) -> dict[str, Any]:
    return pod_spec(workload)["containers"][0]


def pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


def settings_class(service: str) -> type[Any]:
    return importlib.import_module(f"services.{service}.main").SETTINGS


def is_public(service: str) -> bool:
    """Whether the service serves callers outside the mesh (no mTLS port, so no health port): `public=True`."""
    return "public=True" in (ROOT / "services" / service / "main.py").read_text()


# ---- the container's environment, as the kubelet builds it -------------------------------------------------------

def container_env(docs: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The variables the container starts with: its ConfigMaps' keys, then its own `env` (each `$(NAME)` expanded
    from those before it), fieldRefs and Secrets given stand-in values."""
    config_maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in of_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), variable["value"])
        elif "fieldRef" in variable["valueFrom"]:
            env[variable["name"]] = FIELD_VALUES[variable["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            assert "secretKeyRef" in variable["valueFrom"], variable
            env[variable["name"]] = SECRET_VALUE
    return env


def unknown_variables(docs: list[dict[str, Any]], service: str, container: dict[str, Any]) -> set[str]:
    """The variables the container sets that `lmesh serve SERVICE` never reads."""
    read = {spec.env for cls in (ServiceConfig, settings_class(service)) for _, spec in declared(cls) if spec.env}
    names = set(container_env(docs, container))
    helpers_used = {name for name in MANIFEST_ONLY
                    if any(f"$({name})" in v.get("value", "") for v in container.get("env", []))}
    return {name for name in names - read - READ_OUTSIDE_SETTINGS - helpers_used if not name.startswith("OTEL_")}


def mounted_files(docs: list[dict[str, Any]], workload: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """The files the container's ConfigMap and Secret volumes put at their mount paths, written under tmp_path
    (a Secret's as a stand-in): path in the pod -> path here."""
    config_maps = {doc["metadata"]["name"]: doc.get("data", {}) for doc in of_kind(docs, "ConfigMap")}
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    files = {}
    for mount in container_of(workload).get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "configMap" in volume:
            contents = config_maps[volume["configMap"]["name"]]
        elif "secret" in volume:
            contents = {key: f"stand-in for {key}\n" for key in SECRET_KEYS[volume["secret"]["secretName"]]}
        else:
            continue
        for key, text in contents.items():
            here = tmp_path / mount["mountPath"].lstrip("/") / key
            here.parent.mkdir(parents=True, exist_ok=True)
            here.write_text(text)
            files[f"{mount['mountPath']}/{key}"] = str(here)
    return files


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No lmesh, OpenTelemetry or Consul variable of this process leaks into a container's config."""
    for name in list(os.environ):
        if name.startswith(("LMESH_", "OTEL_", "CONSUL_")):
            monkeypatch.delenv(name)
    return monkeypatch


def start_config(docs: list[dict[str, Any]], service: str, monkeypatch: pytest.MonkeyPatch,
                 tmp_path: Path) -> ServiceConfig:
    """What `lmesh serve` makes of the container's arguments and environment: the real parser, settings and
    start-up checks (a ConfigMap's file is read from a copy here). SystemExit for arguments argparse refuses,
    ConfigError or OSError for settings the service refuses."""
    from services.cli import build_parser

    workload = workloads(docs)[service]
    container = container_of(workload)
    files = mounted_files(docs, workload, tmp_path)
    for name, value in container_env(docs, container).items():
        monkeypatch.setenv(name, files.get(value, value))
    args = build_parser().parse_args(container["args"])  # reads the environment defaults now
    assert args.service == service
    config = config_from_args(service, args, settings_class(service))
    check = getattr(importlib.import_module(f"services.{service}.main"), "check_config", None)
    if check is not None:
        check(config)
    return config


# ---- schemas ---------------------------------------------------------------------------------------------------

def test_every_document_validates_against_the_kubernetes_schemas() -> None:
    docs = documents()
    assert {doc["kind"] for doc in docs} == {"Namespace", "ConfigMap", "Service", "StatefulSet", "Deployment",
                                             "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        # Everything in one namespace of its own (the default-deny policy covers exactly it).
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "lmesh", doc["metadata"]["name"]


@pytest.mark.parametrize("break_it", ["unknown field", "wrong type", "missing field"])
def test_the_schema_check_refuses_a_broken_workload(break_it: str) -> None:
    workload = copy.deepcopy(workloads(documents())["inference"])
    container = container_of(workload)
    if break_it == "unknown field":
        container["imagePulPolicy"] = container.pop("imagePullPolicy")
    elif break_it == "wrong type":
        container["ports"][0]["containerPort"] = "seven thousand"
    else:
        del workload["spec"]["selector"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(workload, KUBERNETES_VERSION, strict=True)


def test_the_consul_values_give_every_node_an_agent_with_plain_http_and_connect() -> None:
    """What lmesh.yaml assumes of Consul: a client agent per node on hostPort 8500 (the chart serves plain HTTP
    there unless TLS is HTTPS-only), Connect's CA on, no sidecars (the services speak Connect themselves)."""
    values = yaml.safe_load(CONSUL_VALUES.read_text())
    assert values["client"]["enabled"] is True and values["server"]["connect"] is True
    assert values["global"]["tls"]["enabled"] is True and values["global"]["tls"]["httpsOnly"] is False
    assert values["global"]["acls"]["manageSystemACLs"] is True
    assert values["connectInject"]["enabled"] is False
    for workload in workloads(documents()).values():
        env = container_env(documents(), container_of(workload))
        assert env["CONSUL_HTTP_ADDR"] == f"{FIELD_VALUES['status.hostIP']}:8500"


# ---- security ------------------------------------------------------------------------------------------------

def security_problems(workload: dict[str, Any]) -> list[str]:
    """What keeps a workload from the restricted profile lmesh.yaml promises, one line each."""
    problems = []
    spec = pod_spec(workload)
    pod = spec.get("securityContext", {})
    if spec.get("automountServiceAccountToken") is not False:
        problems.append("a service account token is mounted")
    if spec.get("enableServiceLinks") is not False:
        problems.append("service links set LMESH_GATEWAY_PORT=tcp://... beside lmesh's own variable")
    if pod.get("runAsNonRoot") is not True or pod.get("runAsUser", 0) < 10000:
        problems.append("the pod may run as root or a low UID")
    if pod.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        problems.append("the pod has no RuntimeDefault seccomp profile")
    for container in spec["containers"]:
        context = container.get("securityContext", {})
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{container['name']}: privilege escalation allowed")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{container['name']}: writable root filesystem")
        if context.get("capabilities", {}).get("drop") != ["ALL"] or context["capabilities"].get("add"):
            problems.append(f"{container['name']}: capabilities not all dropped")
        resources = container.get("resources", {})
        for kind in ("requests", "limits"):
            if set(resources.get(kind, {})) < {"cpu", "memory"}:
                problems.append(f"{container['name']}: no cpu and memory {kind}")
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in container:
                problems.append(f"{container['name']}: no {probe}")
        # A read-only root needs a volume wherever the service writes: /tmp, LMESH_HOME, LMESH_CACHE, --data-dir.
        mounts = [m["mountPath"] for m in container.get("volumeMounts", []) if not m.get("readOnly")]
        env = container_env(documents(), container)
        args = container["args"]
        written = ["/tmp", env.get("LMESH_HOME", ""), env.get("LMESH_CACHE", "")]
        written += [args[args.index("--data-dir") + 1]] if "--data-dir" in args else []
        for path in written:
            if not any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts):
                problems.append(f"{container['name']}: {path or 'an unset directory'} is not on a writable volume")
    return problems


def test_every_workload_runs_restricted_with_probes_limits_and_writable_volumes() -> None:
    found = workloads(documents())
    assert found
    for service, workload in found.items():
        assert security_problems(workload) == [], service


@pytest.mark.parametrize(("path", "value", "problem"), [
    (("securityContext", "readOnlyRootFilesystem"), False, "inference: writable root filesystem"),
    (("securityContext", "allowPrivilegeEscalation"), True, "inference: privilege escalation allowed"),
    (("resources", "limits"), {"memory": "6Gi"}, "inference: no cpu and memory limits"),
    (("livenessProbe",), None, "inference: no livenessProbe"),
])
def test_a_weakened_workload_is_named(path: tuple[str, ...], value: Any, problem: str) -> None:
    workload = copy.deepcopy(workloads(documents())["inference"])
    target = container_of(workload)
    for key in path[:-1]:
        target = target[key]
    if value is None:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    assert security_problems(workload) == [problem]


def test_a_workload_without_a_writable_cache_is_named() -> None:
    workload = copy.deepcopy(workloads(documents())["inference"])
    container = container_of(workload)
    container["volumeMounts"] = [m for m in container["volumeMounts"] if m["mountPath"] != "/cache"]
    assert security_problems(workload) == ["inference: /cache is not on a writable volume"]


def checkov_command() -> str | None:
    """checkov, from LMESH_CHECKOV, PATH or beside this interpreter. It is kept out of the dev extra: it pins
    packaging<24, which pytest 9 refuses, so it lives in an environment of its own."""
    candidates = [os.environ.get("LMESH_CHECKOV", ""), shutil.which("checkov") or "",
                  str(Path(sys.executable).parent / "checkov")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def test_checkov_finds_nothing_but_the_skips_the_manifest_gives_reasons_for(tmp_path: Path) -> None:
    checkov = checkov_command()
    if checkov is None:
        pytest.skip("checkov is not installed: `make checkov` (make test runs it), then "
                    "LMESH_CHECKOV=$LMESH_CACHE/checkov/bin/checkov")
    # Offline: no download of Bridgecrew's policies or guideline mapping (they would only add guideline links).
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false",
           "HOME": str(tmp_path)}
    run = subprocess.run([checkov, "-f", str(MANIFEST), "--framework", "kubernetes", "--skip-download",
                          "--output", "json"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert run.returncode in (0, 1), run.stderr[-2000:]
    report = json.loads(run.stdout)
    results = report["results"]
    assert [(r["check_id"], r["resource"]) for r in results["failed_checks"]] == []
    assert results["parsing_errors"] == []
    # Each skip is one the test knows, on a workload, with the manifest's reason.
    skipped = {(r["check_id"], r["resource"].rsplit(".", 1)[-1]) for r in results["skipped_checks"]}
    names = {w["metadata"]["name"] for w in workloads(documents()).values()}
    assert skipped == {(check, name) for check in CHECKOV_SKIPS for name in names}
    assert all(r["check_result"].get("suppress_comment") for r in results["skipped_checks"])
    # The checks that matter most ran, and passed on every workload.
    passed = {(r["check_id"], r["resource"].rsplit(".", 1)[-1]) for r in results["passed_checks"]}
    for check in ("CKV_K8S_22", "CKV_K8S_20", "CKV_K8S_37", "CKV_K8S_31", "CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_11"):
        assert {(check, name) for name in names} <= passed, check


# ---- what the services read ------------------------------------------------------------------------------

def test_every_service_has_exactly_one_workload() -> None:
    from services.cli import SERVICES

    mains = {path.parent.name for path in (ROOT / "services").glob("*/main.py")
             if "SETTINGS = " in path.read_text()}
    assert mains == set(SERVICES) == set(workloads(documents()))
    assert {p.name for p in PEER_SERVICES} == {f"lmesh-{s}" for s in SERVICES}
    for service, workload in workloads(documents()).items():
        # The pods' app label is the service's Consul name: what the NetworkPolicies and PDBs select.
        assert pod_labels(workload) == {"app": f"lmesh-{service}"} == workload["spec"]["selector"]["matchLabels"]


def test_every_variable_the_manifests_set_is_one_the_service_reads() -> None:
    docs = documents()
    for service, workload in workloads(docs).items():
        assert unknown_variables(docs, service, container_of(workload)) == set(), service


def test_each_secret_a_container_reads_is_one_the_readme_says_to_create() -> None:
    """The Consul token is optional (a Consul without ACLs needs none), so a misspelt key would go unnoticed until
    Consul refuses the service: each service reads its own key of lmesh-consul-tokens, and only policy and registry
    the admin token."""
    (token_keys,) = re.findall(r"for s in ([a-z ]+); do", (MANIFEST.parent / "README.md").read_text())
    assert set(token_keys.split()) == set(workloads(documents()))
    for service, workload in workloads(documents()).items():
        refs = {v["name"]: v["valueFrom"]["secretKeyRef"] for v in container_of(workload)["env"]
                if "secretKeyRef" in v.get("valueFrom", {})}
        assert refs.pop("CONSUL_HTTP_TOKEN") == {"name": "lmesh-consul-tokens", "key": service, "optional": True}
        admin = refs.pop("LMESH_ADMIN_TOKEN", None)
        assert admin == ({"name": "lmesh-admin", "key": "token"} if service in ("policy", "registry") else None)
        assert refs == {}, service


def test_a_variable_no_code_reads_or_another_service_reads_is_named() -> None:
    docs = documents()
    container = copy.deepcopy(container_of(workloads(docs)["tokenizer"]))
    container["env"] += [{"name": "LMESH_MAX_ACTIV", "value": "4"}, {"name": "LMESH_POLICY_RULES", "value": "/x"}]
    assert unknown_variables(docs, "tokenizer", container) == {"LMESH_MAX_ACTIV", "LMESH_POLICY_RULES"}


def test_the_variables_read_outside_the_settings_are_read(clean_environment: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    import consul

    clean_environment.setenv("LMESH_HOME", str(tmp_path / "home"))
    clean_environment.setenv("LMESH_CACHE", str(tmp_path / "cache"))
    clean_environment.setenv("CONSUL_HTTP_TOKEN", "token-from-test")
    assert lmesh_home() == tmp_path / "home" and lmesh_cache() == tmp_path / "cache"
    assert consul.Consul().token == "token-from-test"  # py-consul sends it with every call to the agent


def test_every_container_starts_with_arguments_and_environment_its_service_accepts(
        clean_environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    docs = documents()
    for service in workloads(docs):
        with clean_environment.context() as monkeypatch:
            config = start_config(docs, service, monkeypatch, tmp_path / service)
        assert config.service == service and config.consul_service_name == f"lmesh-{service}"
        assert config.advertise_host == FIELD_VALUES["status.podIP"] and config.binds_wildcard
        assert config.mtls
        # ONNX Runtime's threads: no more than the CPUs the container may use (0 would mean the node's cores).
        threads = getattr(config.settings, "threads", None)
        if threads is not None:
            limit = container_of(workloads(docs)[service])["resources"]["limits"]["cpu"]
            assert 0 < threads <= cpus(limit), service


def cpus(quantity: str) -> float:
    """A Kubernetes CPU quantity ("500m", "2") in CPUs."""
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize(("service", "change", "refused"), [
    ("inference", ("args", "--max-actives"), SystemExit),  # argparse takes a prefix
    ("inference", ("env", {"name": "LMESH_MAX_ACTIVE", "value": "0"}), ConfigError),
    ("gateway", ("env", {"name": "LMESH_TLS_CERT", "value": "/etc/lmesh/tls/tls.crt"}), ConfigError),
    ("registry", ("drop", "LMESH_ADMIN_TOKEN"), OSError),
])
def test_a_container_its_service_would_refuse_is_refused(
        clean_environment: pytest.MonkeyPatch, tmp_path: Path, service: str, change: tuple[str, Any],
        refused: type[BaseException]) -> None:
    docs = documents()
    container = container_of(workloads(docs)[service])
    kind, what = change
    if kind == "args":
        container["args"] = [*container["args"], what, "4"]
    elif kind == "env":
        container["env"].append(what)
    else:
        container["env"] = [v for v in container["env"] if v["name"] != what]
    with pytest.raises(refused):
        start_config(docs, service, clean_environment, tmp_path)


def test_the_gateways_tls_settings_commented_in_the_manifest_work_once_uncommented(
        clean_environment: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """TLS at the public door is a matter of uncommenting its variables: they are the gateway's settings, and name
    files that its optional Secret volumes provide. The readiness probe the comment offers for TLS asks a route
    the HTTP API serves."""
    from services.gateway.http_server import OPENAPI

    docs = documents()
    commented = [yaml.safe_load(line.split("# - ", 1)[1]) for line in MANIFEST.read_text().splitlines()
                 if re.match(r"\s*# - \{name: LMESH_TLS_", line)]
    assert {v["name"] for v in commented} == {"LMESH_TLS_CERT", "LMESH_TLS_KEY", "LMESH_TLS_CLIENT_CA",
                                              "LMESH_TLS_CLIENT_CERT_PORT"}
    container = container_of(workloads(docs)["gateway"])
    container["env"] += commented
    assert unknown_variables(docs, "gateway", container) == set()
    config = start_config(docs, "gateway", clean_environment, tmp_path)
    settings = config.settings_as(settings_class("gateway"))
    assert (settings.tls_cert.name, settings.tls_key.name, settings.tls_client_ca.name) == ("tls.crt", "tls.key",
                                                                                            "ca.crt")
    assert settings.tls_client_cert_port == 50052
    assert f"httpGet: {{path: {OPENAPI}, port: http, scheme: HTTPS}}" in MANIFEST.read_text()


# ---- ports ----------------------------------------------------------------------------------------------------

def container_ports(workload: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container_of(workload)["ports"]}


def resolve(workload: dict[str, Any], port: int | str) -> int:
    """A named or numbered port of the workload's container (KeyError when it has none such)."""
    ports = container_ports(workload)
    if isinstance(port, str):
        return ports[port]
    if port not in ports.values():
        raise KeyError(port)
    return port


def selected(docs: list[dict[str, Any]], selector: dict[str, Any]) -> list[dict[str, Any]]:
    """The workloads whose pods a label selector (matchLabels / matchExpressions In) selects."""
    def matches(labels: dict[str, str]) -> bool:
        if not set(selector.get("matchLabels", {}).items()) <= set(labels.items()):
            return False
        return all(e["operator"] == "In" and labels.get(e["key"]) in e["values"]
                   for e in selector.get("matchExpressions", []))

    return [w for w in workloads(docs).values() if matches(pod_labels(w))]


def test_the_ports_agree_with_the_settings_probes_and_services(clean_environment: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    docs = documents()
    for service, workload in workloads(docs).items():
        with clean_environment.context() as monkeypatch:
            config = start_config(docs, service, monkeypatch, tmp_path / service)
        expected = {"grpc": config.port, "metrics": config.metrics_port}
        if is_public(service):  # the gateway: its own HTTP port, and no health port (nothing asks for a cert)
            expected["http"] = config.settings_as(settings_class(service)).http_port
        else:
            expected["health"] = config.health_port
        assert container_ports(workload) == expected, service
        container = container_of(workload)
        for name in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container[name]
            if "exec" in probe:  # `lmesh health 127.0.0.1:<health port> --mesh lmesh-<service>`
                from services.cli import build_parser

                args = build_parser().parse_args(probe["exec"]["command"][1:])
                assert probe["exec"]["command"][0] == "lmesh" and args.command == "health", service
                assert args.target == f"127.0.0.1:{config.health_port}" and args.mesh == f"lmesh-{service}"
            elif "grpc" in probe:  # kubelet's gRPC probe speaks plaintext: only a public port without TLS
                assert is_public(service) and resolve(workload, probe["grpc"]["port"]) == config.port
            else:
                assert resolve(workload, probe["httpGet"]["port"]) == config.metrics_port, (service, name)
    for doc in of_kind(docs, "Service"):
        (workload,) = selected(docs, {"matchLabels": doc["spec"]["selector"]})
        for port in doc["spec"]["ports"]:
            resolve(workload, port["targetPort"])
        if doc["spec"].get("clusterIP") == "None":  # a StatefulSet's governing Service
            assert workload["kind"] == "StatefulSet" and workload["spec"]["serviceName"] == doc["metadata"]["name"]
    for doc in of_kind(docs, "NetworkPolicy"):
        for workload in selected(docs, doc["spec"]["podSelector"]):
            for rule in doc["spec"].get("ingress", []):
                for port in rule["ports"]:
                    resolve(workload, port["port"])


def test_every_workload_has_a_disruption_budget_and_inference_an_autoscaler_on_its_queue() -> None:
    docs = documents()
    budgets = [selected(docs, doc["spec"]["selector"]) for doc in of_kind(docs, "PodDisruptionBudget")]
    assert sorted(w["metadata"]["name"] for (w,) in budgets) == sorted(
        w["metadata"]["name"] for w in workloads(docs).values())
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    inference = workloads(docs)["inference"]
    assert (target["kind"], target["name"]) == (inference["kind"], inference["metadata"]["name"])
    assert "replicas" not in inference["spec"]  # the autoscaler owns the count
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    assert metric["pods"]["metric"]["name"] in inference_gauges()


def inference_gauges() -> set[str]:
    """The gauges lmesh-inference serves on /metrics, as Prometheus names them (one replica serving a model)."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from services.inference.metrics import InferenceMetrics

    engine = SimpleNamespace(load=lambda: {"active": 1, "queued": 3, "kv_bytes": 0, "prefix_cache_bytes": 0},
                             prefix_cache=SimpleNamespace(stats=SimpleNamespace(hits=0, misses=0, evictions=0)),
                             shed={})
    registry = CollectorRegistry()
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry)])
    try:
        InferenceMetrics(provider.get_meter("lmesh.inference"), lambda: {"tiny:1": engine})  # type: ignore[dict-item]
        families = text_string_to_metric_families(generate_latest(registry).decode())
        return {family.name for family in families if family.type == "gauge"}
    finally:
        provider.shutdown()


# ---- network policies and the request path ---------------------------------------------------------------------

def admitted(doc: dict[str, Any], port: str) -> Iterator[dict[str, Any]]:
    """The `from` peers of the policy's rules that cover `port` ({} for a rule open to every source)."""
    for rule in doc["spec"].get("ingress", []):
        if any(p["port"] == port for p in rule["ports"]):
            yield from rule.get("from", [{}])


def callers(doc: dict[str, Any], port: str = "grpc") -> set[str]:
    """The mesh identities a NetworkPolicy lets reach `port`: lmesh pods by their app label (their Consul name),
    operators' pods as lmesh-operator, "*" for everyone; anything else by how it is selected."""
    found = set()
    for peer in admitted(doc, port):
        labels = peer.get("podSelector", {}).get("matchLabels", {})
        if not peer:
            found.add("*")
        elif "namespaceSelector" in peer:
            found.add(f"{peer['namespaceSelector']['matchLabels']['kubernetes.io/metadata.name']}/"
                      + ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
        elif labels == dict([OPERATOR_LABEL]):
            found.add(OPERATOR)
        else:
            found |= {labels["app"]} if "app" in labels else set()
            found |= {v for e in peer["podSelector"].get("matchExpressions", []) if e["key"] == "app"
                      for v in e["values"]}
    return found


def namespaced(peer: dict[str, Any]) -> str:
    return f"{peer['namespace']}/" + ",".join(f"{k}={v}" for k, v in sorted(peer["labels"].items()))


def policies_by_service(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each service's own NetworkPolicy (it selects that service's pods by their app label)."""
    found = {}
    for doc in of_kind(docs, "NetworkPolicy"):
        app = doc["spec"]["podSelector"].get("matchLabels", {}).get("app")
        if app is not None:
            assert app not in found, f"two policies for {app}"
            found[app] = doc
    return found


def test_by_default_nothing_reaches_an_lmesh_pod() -> None:
    deny = [doc for doc in of_kind(documents(), "NetworkPolicy") if doc["spec"]["podSelector"] == {}]
    assert len(deny) == 1 and deny[0]["spec"]["policyTypes"] == ["Ingress"] and not deny[0]["spec"].get("ingress")


def test_the_network_policies_admit_exactly_the_request_path_of_the_intentions() -> None:
    """The Consul names the policies talk about are the services' (peers.py), and who may reach each API port is
    who `lmesh intentions` allows to call it (connect.py MESH_CALLS), operators included."""
    docs = documents()
    policies = policies_by_service(docs)
    names = {p.name for p in PEER_SERVICES}
    assert set(policies) == names
    for name, doc in policies.items():
        allowed = {source for source, destinations in MESH_CALLS.items() if name in destinations}
        if name == "lmesh-gateway":  # the public door: anyone, on gRPC and HTTP
            assert callers(doc, "grpc") == callers(doc, "http") == {"*"}
            assert callers(doc, "metrics") == {namespaced(PROMETHEUS), OPERATOR}  # `lmesh models stats`
            continue
        assert callers(doc) == allowed, name
        assert callers(doc) - {OPERATOR} <= names
        assert callers(doc, "health") == {namespaced(CONSUL_AGENTS)}, name
        assert callers(doc, "metrics") == {namespaced(PROMETHEUS)}, name


def test_a_policy_that_strays_from_the_intentions_is_caught() -> None:
    doc = copy.deepcopy(policies_by_service(documents())["lmesh-registry"])
    doc["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"].append("lmesh-tools")
    allowed = {source for source, destinations in MESH_CALLS.items() if "lmesh-registry" in destinations}
    assert callers(doc) == allowed | {"lmesh-tools"}
