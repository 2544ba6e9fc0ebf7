"""Kubernetes manifests and container images: rendered offline, validated, and checked for invariants.

The kustomizations under k8s/ are rendered by k8s/render.py (no kustomize binary needed; compared
with the real kustomize when one is installed). Built-in resources are validated with
kubernetes-validate against a pinned Kubernetes version; custom resources (Strimzi, KEDA, Milvus)
against the required fields of their CRDs, written down below.
"""

from __future__ import annotations

import copy
import importlib.util
import re
from decimal import Decimal
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest

from onetower.worker import app_id
from streams import metrics

from core.settings import Settings
from streams.topics import topic_kinds

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
# The Kubernetes version the manifests must be valid for (Strimzi 0.45 needs >= 1.25; KEDA 2.17
# supports 1.30-1.32).
K8S_VERSION = "1.32"
RUN_AS_USER = 10001  # USER of both images (docker/)
OVERLAYS = ("cpu", "gpu")


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"k8s_{name}", K8S / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load("render")
render_env = _load("render_env")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Each kustomization rendered once by the Python renderer: deps, cpu, gpu."""
    out = {"deps": render.build(K8S / "deps")}
    out.update({name: render.build(K8S / "overlays" / name) for name in OVERLAYS})
    return out


def one(resources: list[dict], kind: str, name: str | None = None, prefix: str | None = None) -> dict:
    hits = [r for r in resources if r["kind"] == kind
            and (name is None or r["metadata"]["name"] == name)
            and (prefix is None or r["metadata"]["name"].startswith(prefix))]
    assert len(hits) == 1, f"expected one {kind} {name or prefix or ''}, found {len(hits)}"
    return hits[0]


def containers(resource: dict) -> list[dict]:
    return [c for pod in render.pod_specs(resource) for c in pod.get("containers", []) + pod.get("initContainers", [])]


def settings_env(resources: list[dict]) -> dict[str, str]:
    return one(resources, "ConfigMap", prefix="onetower-settings-")["data"]


def parse_quantity(q: str | int) -> Decimal:
    """Kubernetes quantities as used here (m, Ki..Ti, k..T, plain); no Python library is installed for it."""
    m = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, f"unparsable quantity {q!r}"
    scale = {None: 1, "m": Decimal("0.001"), "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}[m.group(2)]
    return Decimal(m.group(1)) * scale


# --- custom resources: the required fields of their CRDs --------------------------------------

_LABELLED_BY_CLUSTER = {"type": "object", "required": ["labels"],
                        "properties": {"labels": {"type": "object", "required": ["strimzi.io/cluster"]}}}
CR_SCHEMAS: dict[tuple[str, str], dict] = {
    # Strimzi 0.45 (kafka.strimzi.io/v1beta2); KRaft and node pools are opt-in by annotation there.
    ("kafka.strimzi.io/v1beta2", "Kafka"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {
            "metadata": {"type": "object", "required": ["annotations"], "properties": {"annotations": {
                "type": "object", "required": ["strimzi.io/kraft", "strimzi.io/node-pools"],
                "properties": {"strimzi.io/kraft": {"const": "enabled"}, "strimzi.io/node-pools": {"const": "enabled"}}}}},
            "spec": {"type": "object", "required": ["kafka", "entityOperator"], "properties": {
                "kafka": {"type": "object", "required": ["listeners", "version"], "properties": {
                    "version": {"type": "string", "pattern": r"^3\.9\.\d+$"},  # the last line Strimzi 0.45 runs
                    "listeners": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["name", "port", "type", "tls"],
                        "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]{1,11}$"},
                                       "port": {"type": "integer", "minimum": 9092},
                                       "type": {"enum": ["internal", "route", "loadbalancer", "nodeport", "ingress", "cluster-ip"]},
                                       "tls": {"type": "boolean"}}}},
                    "config": {"type": "object"}}},
                "entityOperator": {"type": "object", "required": ["topicOperator"]}}},
        },
    },
    ("kafka.strimzi.io/v1beta2", "KafkaNodePool"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {"metadata": _LABELLED_BY_CLUSTER, "spec": {
            "type": "object", "required": ["replicas", "roles", "storage"],
            "properties": {"replicas": {"type": "integer", "minimum": 1},
                           "roles": {"type": "array", "minItems": 1, "items": {"enum": ["controller", "broker"]}},
                           "storage": {"type": "object", "required": ["type"],
                                       "properties": {"type": {"enum": ["ephemeral", "persistent-claim", "jbod"]}}},
                           "resources": {"type": "object", "required": ["requests", "limits"]}}}},
    },
    ("kafka.strimzi.io/v1beta2", "KafkaTopic"): {
        "type": "object",
        "required": ["metadata", "spec"],
        "properties": {"metadata": _LABELLED_BY_CLUSTER, "spec": {
            "type": "object", "required": ["topicName", "partitions", "replicas"],
            "properties": {"topicName": {"type": "string", "pattern": r"^[a-zA-Z0-9._-]{1,249}$"},
                           "partitions": {"type": "integer", "minimum": 1},
                           "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                           "config": {"type": "object"}}}},
    },
    # KEDA 2.x
    ("keda.sh/v1alpha1", "ScaledObject"): {
        "type": "object",
        "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {"type": "object", "required": ["name"]},
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "triggers": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["type", "metadata"],
                    "properties": {"metadata": {"type": "object", "additionalProperties": {"type": "string"}}},
                    "if": {"properties": {"type": {"const": "kafka"}}},
                    "then": {"properties": {"metadata": {"required": ["bootstrapServers", "consumerGroup", "lagThreshold"]}}}}}}}},
    },
    # Milvus operator
    ("milvus.io/v1beta1", "Milvus"): {
        "type": "object",
        "required": ["spec"],
        "properties": {"spec": {
            "type": "object", "required": ["mode", "dependencies"],
            "properties": {
                "mode": {"enum": ["standalone", "cluster"]},
                "dependencies": {
                    "type": "object",
                    "if": {"required": ["msgStreamType"], "properties": {"msgStreamType": {"const": "kafka"}}},
                    "then": {"required": ["kafka"], "properties": {"kafka": {
                        "type": "object", "required": ["external", "brokerList"],
                        "properties": {"external": {"const": True}, "brokerList": {"type": "array", "minItems": 1}}}}}}}}},
    },
}


def validate(resource: dict) -> None:
    """Built-in kinds: kubernetes-validate, strict (unknown fields fail). Custom kinds: CR_SCHEMAS."""
    key = (resource["apiVersion"], resource["kind"])
    if key in CR_SCHEMAS:
        jsonschema.validate(resource, CR_SCHEMAS[key])
    else:
        kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


# --- rendering ----------------------------------------------------------------------------

def test_generated_files_are_current():
    stale = [str(p.relative_to(ROOT)) for p, text in render_env.render().items() if p.read_text() != text]
    assert not stale, f"stale generated files {stale}: run `python k8s/render_env.py`"


@pytest.mark.skipif(render.kustomize_command() is None, reason="no kustomize or kubectl installed to compare with")
@pytest.mark.parametrize("path", ["base", "deps", "overlays/cpu", "overlays/gpu"])
def test_python_renderer_matches_kustomize(path):
    def keyed(resources):
        return {(r["apiVersion"], r["kind"], r["metadata"].get("namespace"), r["metadata"]["name"]): r for r in resources}

    ours, theirs = keyed(render.build(K8S / path)), keyed(render.build_with_kustomize(K8S / path))
    assert set(ours) == set(theirs), f"resources differ: {sorted(set(ours) ^ set(theirs))}"
    for key, resource in ours.items():
        assert resource == theirs[key], f"{key} renders differently from {' '.join(render.kustomize_command())}"


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nreplicas:\n  - {name: x, count: 2}\n")
    with pytest.raises(render.KustomizeError, match="unsupported fields"):
        render.build(tmp_path)


def test_renderer_merges_patches_by_name_and_renames_generated_references(tmp_path):
    (tmp_path / "d.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n"
        "      containers:\n        - {name: a, image: img:1, env: [{name: X, value: '1'}, {name: Y, value: '2'}],"
        " envFrom: [{configMapRef: {name: cm}}]}\n        - {name: b, image: other}\n")
    (tmp_path / "p.yaml").write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n"
        "      containers:\n        - {name: a, env: [{name: Y, value: '3'}]}\n")
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [d.yaml]\npatches: [{path: p.yaml}]\nconfigMapGenerator: [{name: cm, literals: [K=v]}]\n"
        "images: [{name: img, newName: reg/img, newTag: '2'}]\n")
    out = render.build(tmp_path)
    cm = one(out, "ConfigMap")
    a, b = containers(one(out, "Deployment", "d"))
    assert a["env"] == [{"name": "Y", "value": "3"}, {"name": "X", "value": "1"}]
    assert a["envFrom"] == [{"configMapRef": {"name": cm["metadata"]["name"]}}]
    assert re.fullmatch(r"cm-[a-z0-9]{10}", cm["metadata"]["name"])
    assert (a["image"], b["image"]) == ("reg/img:2", "other")


# --- validation ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deps", *OVERLAYS])
def test_every_resource_validates(rendered, name):
    kinds = set()
    for resource in rendered[name]:
        try:
            validate(resource)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{resource['apiVersion']} {resource['kind']}: neither a Kubernetes {K8S_VERSION} kind nor in CR_SCHEMAS")
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            pytest.fail(f"{resource['kind']}/{resource['metadata']['name']} is invalid: {exc}")
        kinds.add(resource["kind"])
    expected = ({"Kafka", "KafkaNodePool", "KafkaTopic", "StatefulSet", "Service", "Milvus"} if name == "deps" else
                {"Deployment", "Service", "PodDisruptionBudget", "Job", "ConfigMap", "Secret", "ScaledObject", "PersistentVolumeClaim",
                 "NetworkPolicy"})
    assert kinds == expected


def test_validation_catches_broken_manifests(rendered):
    """The validators are not vacuous: a misspelt field and a missing required field both fail."""
    worker = copy.deepcopy(one(rendered["cpu"], "Deployment", "onetower-worker"))
    containers(worker)[0]["resource"] = containers(worker)[0].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(worker)
    topic = copy.deepcopy(one(rendered["deps"], "KafkaTopic", "onetower-items"))
    del topic["spec"]["partitions"]
    with pytest.raises(jsonschema.ValidationError):
        validate(topic)
    scaled = copy.deepcopy(one(rendered["cpu"], "ScaledObject"))
    del scaled["spec"]["triggers"][0]["metadata"]["consumerGroup"]
    with pytest.raises(jsonschema.ValidationError):
        validate(scaled)


# --- settings -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", OVERLAYS)
def test_configmap_and_secret_hold_only_settings_fields(rendered, name, monkeypatch):
    fields = {render_env.env_name(f): f for f in Settings.model_fields}
    env = settings_env(rendered[name])
    secret = one(rendered[name], "Secret", prefix="onetower-secrets-")["data"]
    for key in [*env, *secret]:
        assert key in fields, f"{key} is not a Settings field (core/settings.py); regenerate with k8s/render_env.py"
    assert not set(env) & set(secret)
    assert {fields[k] for k in secret} == render_env.SECRET_FIELDS
    # The pods' environment reads back as the in-cluster settings.
    for key in fields:
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert Settings(_env_file=None) == render_env.in_cluster_settings()


@pytest.mark.parametrize("name", OVERLAYS)
def test_pods_reach_what_deps_create(rendered, name):
    """Addresses in the ConfigMap name the Services that deps/ and its operators create."""
    deps, app = rendered["deps"], rendered[name]
    env = settings_env(app)
    namespace = one(app, "Deployment", "onetower-worker")["metadata"]["namespace"]
    kafka, milvus = one(deps, "Kafka"), one(deps, "Milvus")
    redis = one(deps, "Service", "redis")
    assert {r["metadata"]["namespace"] for r in deps + app} == {namespace}
    assert env["ONETOWER_KAFKA_BOOTSTRAP"] == f"{kafka['metadata']['name']}-kafka-bootstrap.{namespace}.svc:{kafka['spec']['kafka']['listeners'][0]['port']}"
    assert env["ONETOWER_REDIS_URL"].startswith(f"redis://{redis['metadata']['name']}.{namespace}.svc:{redis['spec']['ports'][0]['port']}/")
    assert env["ONETOWER_MILVUS_URI"] == f"http://{milvus['metadata']['name']}-milvus.{namespace}.svc:19530"
    assert milvus["spec"]["dependencies"]["kafka"]["brokerList"] == [env["ONETOWER_KAFKA_BOOTSTRAP"]]
    assert env["ONETOWER_API_HOST"] == "0.0.0.0", "the API must listen on all interfaces in a pod"


@pytest.mark.parametrize("name", OVERLAYS)
def test_references_resolve(rendered, name):
    resources = rendered[name]
    names = {(r["kind"], r["metadata"]["name"]) for r in resources}
    for workload in (r for r in resources if render.pod_specs(r)):
        pod = render.pod_specs(workload)[0]
        for vol in pod.get("volumes", []):
            for kind, ref in (("ConfigMap", vol.get("configMap", {}).get("name")),
                              ("PersistentVolumeClaim", vol.get("persistentVolumeClaim", {}).get("claimName"))):
                assert ref is None or (kind, ref) in names, f"{workload['metadata']['name']}: no {kind} {ref}"
        for c in containers(workload):
            for src in c.get("envFrom", []):
                kind, ref = ("ConfigMap", src["configMapRef"]["name"]) if "configMapRef" in src else ("Secret", src["secretRef"]["name"])
                assert (kind, ref) in names, f"{c['name']}: no {kind} {ref}"
    train = one(resources, "Job", "onetower-train")
    config = next(v for v in render.pod_specs(train)[0]["volumes"] if v["name"] == "config")
    assert "train.yaml" in one(resources, "ConfigMap", config["configMap"]["name"])["data"]
    assert containers(train)[0]["args"][-2:] == ["--config", "/config/train.yaml"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_pod_reads_the_credentials_from_the_secret(rendered, name):
    """Credentials (tokens, passwords) come from the one Secret, never from the ConfigMap."""
    secret = one(rendered[name], "Secret", prefix="onetower-secrets-")
    assert {"ONETOWER_API_TOKEN", "ONETOWER_KAFKA_SASL_PASSWORD", "ONETOWER_REDIS_PASSWORD", "ONETOWER_MILVUS_TOKEN"} <= set(secret["data"])
    for workload in (r for r in rendered[name] if render.pod_specs(r)):
        for c in containers(workload):
            refs = [src["secretRef"]["name"] for src in c.get("envFrom", []) if "secretRef" in src]
            assert refs == [secret["metadata"]["name"]], f"{workload['metadata']['name']}/{c['name']} must read the Secret"


def ingress_rules(policies: list[dict], labels: dict) -> list[dict] | None:
    """The ingress rules that apply to a pod with ``labels``; None when no policy selects it (all open)."""
    selecting = [p for p in policies if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()]
    assert all(p["spec"]["policyTypes"] == ["Ingress"] for p in selecting)
    return None if not selecting else [rule for p in selecting for rule in p["spec"].get("ingress", [])]


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policies_open_only_the_api_and_the_worker_metrics(rendered, name):
    app, deps = rendered[name], rendered["deps"]
    policies = [r for r in app if r["kind"] == "NetworkPolicy"]
    for workload in (r for r in deps if render.pod_specs(r)):  # Kafka, Redis, Milvus: not onetower's to restrict
        assert ingress_rules(policies, workload["spec"]["template"]["metadata"]["labels"]) is None
    for workload in (r for r in app if render.pod_specs(r)):
        labels = (workload["spec"].get("template") or workload["spec"]["jobTemplate"]["spec"]["template"])["metadata"]["labels"]
        rules = ingress_rules(policies, labels)
        assert rules is not None, f"{workload['metadata']['name']} is not under the deny-by-default policy"
        ports = {p["port"] for rule in rules for p in rule["ports"]}
        named = {p["name"] for c in containers(workload) for p in c.get("ports", [])}
        component = labels["app.kubernetes.io/component"]
        if component == "api":
            assert ports == {"http"} <= named
            (rule,) = rules
            assert {"podSelector": {}} in rule["from"], "every pod of the namespace must reach the API"
        elif component == "worker":
            assert ports == {"metrics"} <= named
            assert all("from" not in rule for rule in rules), "scrapers may live in any namespace"
        else:
            assert rules == [], f"{workload['metadata']['name']} takes no connections"


# --- invariants ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deps", *OVERLAYS])
def test_every_container_has_requests_and_limits(rendered, name):
    for workload in (r for r in rendered[name] if render.pod_specs(r)):
        for c in containers(workload):
            res = c.get("resources", {})
            for resource in ("cpu", "memory"):
                request, limit = res.get("requests", {}).get(resource), res.get("limits", {}).get(resource)
                where = f"{workload['metadata']['name']}/{c['name']} {resource}"
                assert request is not None and limit is not None, f"{where}: requests and limits are required"
                assert parse_quantity(request) <= parse_quantity(limit), f"{where}: request above limit"


@pytest.mark.parametrize("name", ["deps", *OVERLAYS])
def test_pods_run_as_non_root(rendered, name):
    for workload in (r for r in rendered[name] if render.pod_specs(r)):
        pod = render.pod_specs(workload)[0]
        sec = pod.get("securityContext", {})
        where = workload["metadata"]["name"]
        assert sec.get("runAsNonRoot") is True and sec.get("runAsUser", 0) > 0, f"{where}: must run as a non-root uid"
        if workload["metadata"]["name"].startswith("onetower-"):
            assert sec["runAsUser"] == RUN_AS_USER, f"{where}: runAsUser must be the images' USER {RUN_AS_USER}"
        for c in containers(workload):
            csec = c.get("securityContext", {})
            assert csec.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}: allowPrivilegeEscalation"
            assert csec.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}: drop ALL capabilities"
            if csec.get("readOnlyRootFilesystem"):
                assert any(m["mountPath"] == "/tmp" for m in c.get("volumeMounts", [])) or c["name"] == "redis", \
                    f"{where}/{c['name']}: a read-only root needs a writable /tmp"


@pytest.mark.parametrize("name", OVERLAYS)
def test_worker_scaling_is_bounded_by_partitions(rendered, name):
    app, deps = rendered[name], rendered["deps"]
    partitions = int(settings_env(app)["ONETOWER_TOPIC_PARTITIONS"])
    worker = one(app, "Deployment", "onetower-worker")
    scaled = one(app, "ScaledObject", "onetower-worker")
    assert scaled["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"] == partitions
    assert worker["spec"]["replicas"] <= partitions
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a surge would exceed the partitions"
    trigger = scaled["spec"]["triggers"][0]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["bootstrapServers"] == settings_env(app)["ONETOWER_KAFKA_BOOTSTRAP"]
    assert trigger["metadata"]["consumerGroup"] == app_id(render_env.in_cluster_settings()), \
        "KEDA must watch the lag of the group the workers consume in"
    consumed = [t for t in deps if t["kind"] == "KafkaTopic" and not t["spec"]["topicName"].endswith("dlq")]
    assert consumed and all(t["spec"]["partitions"] >= scaled["spec"]["maxReplicaCount"] for t in consumed)


def test_topics_are_the_applications(rendered):
    deps = rendered["deps"]
    settings = render_env.in_cluster_settings()
    kafka = one(deps, "Kafka")
    topics = [r for r in deps if r["kind"] == "KafkaTopic"]
    assert sorted(t["spec"]["topicName"] for t in topics) == sorted(settings.topic(k) for k in topic_kinds())
    assert all(t["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"] for t in topics)
    by_kind = {t["spec"]["topicName"].removeprefix(settings.topic_prefix): t["spec"]["config"] for t in topics}
    assert by_kind["items"]["cleanup.policy"] == by_kind["users"]["cleanup.policy"] == "compact"
    pool = one(deps, "KafkaNodePool")
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    for t in topics:
        assert t["spec"]["replicas"] <= pool["spec"]["replicas"], "more replicas than brokers"
        assert int(t["spec"]["config"]["min.insync.replicas"]) < t["spec"]["replicas"], "no broker may be lost"


@pytest.mark.parametrize("name", OVERLAYS)
def test_api_probes_service_and_budget(rendered, name):
    app = rendered[name]
    api = one(app, "Deployment", "onetower-api")
    (c,) = containers(api)
    port = int(settings_env(app)["ONETOWER_API_PORT"])
    named = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["args"] == ["serve"]
    assert (c["livenessProbe"]["httpGet"]["path"], c["readinessProbe"]["httpGet"]["path"]) == ("/healthz", "/readyz")
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert named[c[probe]["httpGet"]["port"]] == port, f"{probe} must hit the API port {port}"
    labels = api["spec"]["template"]["metadata"]["labels"]
    service = one(app, "Service", "onetower-api")
    assert service["spec"]["selector"].items() <= labels.items()
    assert named[service["spec"]["ports"][0]["targetPort"]] == port
    pdb = one(app, "PodDisruptionBudget", "onetower-api")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < api["spec"]["replicas"], "the budget must allow one eviction"
    worker = containers(one(app, "Deployment", "onetower-worker"))[0]
    assert worker["args"] == ["worker"]
    assert worker["ports"][0]["containerPort"] == int(settings_env(app)["ONETOWER_WORKER_METRICS_PORT"])


def test_gpu_overlay_puts_encoders_and_training_on_gpus(rendered):
    gpu, cpu = rendered["gpu"], rendered["cpu"]
    for kind, name in (("Deployment", "onetower-worker"), ("Job", "onetower-train"), ("Job", "onetower-reindex")):
        workload = one(gpu, kind, name)
        pod, (c,) = render.pod_specs(workload)[0], containers(workload)
        gpus = c["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus and int(gpus) >= 1 and c["resources"]["requests"].get("nvidia.com/gpu") == gpus, f"{name}: GPU limit = request"
        assert c["image"].split(":")[0].endswith("onetower-cuda"), f"{name}: needs the CUDA image"
        assert any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations", [])), f"{name}: GPU taint toleration"
        assert pod.get("nodeSelector"), f"{name}: GPU nodeSelector"
    train = containers(one(gpu, "Job", "onetower-train"))[0]
    env = {e["name"]: e["value"] for e in train["env"]}
    assert env["PET_NPROC_PER_NODE"] == train["resources"]["limits"]["nvidia.com/gpu"], "one torchrun process per GPU"
    assert train["command"] == ["torchrun"]
    api = containers(one(gpu, "Deployment", "onetower-api"))[0]
    assert "nvidia.com/gpu" not in api["resources"]["limits"] and "cuda" not in api["image"]
    for workload in (r for r in cpu if render.pod_specs(r)):
        for c in containers(workload):
            assert "nvidia.com/gpu" not in c["resources"]["limits"] and "cuda" not in c["image"], f"cpu overlay: {c['name']}"


def test_jobs_do_not_start_on_apply(rendered):
    for name in OVERLAYS:
        for job in (r for r in rendered[name] if r["kind"] == "Job"):
            assert job["spec"]["suspend"] is True, f"{job['metadata']['name']} would run before the topics hold data"


# --- images ------------------------------------------------------------------------------

def dockerfile_stages(path: Path) -> list[list[tuple[str, str]]]:
    """(instruction, arguments) per build stage, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[list[tuple[str, str]]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        if instruction.upper() == "FROM" and stages[-1] and any(i == "FROM" for i, _ in stages[-1]):
            stages.append([])
        stages[-1].append((instruction.upper(), args.strip()))
    return stages


@pytest.mark.parametrize("dockerfile, base", [("Dockerfile", "python:3.11-slim"), ("Dockerfile.cuda", "nvidia/cuda:")])
def test_images_are_non_root_and_take_a_model(dockerfile, base):
    path = ROOT / "docker" / dockerfile
    stages = dockerfile_stages(path)
    final = stages[-1]
    args = {a.split("=", 1)[0]: a.split("=", 1)[-1] for s in stages for i, a in s if i == "ARG"}
    base_image = final[0][1].split()[0]
    assert base in re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), base_image), f"{dockerfile}: base must be {base}"
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] == str(RUN_AS_USER), f"{dockerfile}: final USER must be {RUN_AS_USER}"
    assert ("ARG", "MODEL_DIR=docker/no-model") in final
    assert any(i == "COPY" and "${MODEL_DIR}" in a for i, a in final), f"{dockerfile}: MODEL_DIR is never copied"
    assert len(stages) >= 2 and any(i == "COPY" and "--from=build" in a for i, a in final), f"{dockerfile}: multi-stage"
    if dockerfile == "Dockerfile.cuda":
        assert any(i == "RUN" and '".[gpu]"' in a and "CUDAExecutionProvider" in a for s in stages for i, a in s)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_build_context_holds_what_the_images_copy(dockerfile):
    """Every COPY source exists and survives .dockerignore (docker-py implements its rules)."""
    build = pytest.importorskip("docker.utils.build", reason="docker (docker-py) implements .dockerignore matching")
    patterns = (ROOT / ".dockerignore").read_text().splitlines()
    included = build.exclude_paths(str(ROOT), patterns, dockerfile=f"docker/{dockerfile}")
    for stage in dockerfile_stages(ROOT / "docker" / dockerfile):
        for instruction, args in stage:
            if instruction != "COPY" or "--from=" in args:
                continue
            sources = [s for s in args.split()[:-1] if not s.startswith("--")]
            for source in sources:
                source = source.replace("${MODEL_DIR}", "docker/no-model")
                assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: missing from the repository"
                assert source in included, f"{dockerfile}: COPY {source}: excluded by .dockerignore"


def _exported_names() -> set[str]:
    """Every series name the worker's metrics export (a counter adds _total, a histogram _bucket/_sum/_count)."""
    import indexer.refresher  # noqa: F401 (registers its metrics)
    from prometheus_client import REGISTRY

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {fam.name + s for fam in REGISTRY.collect() for s in suffixes.get(fam.type, ())}


def test_grafana_dashboard_parses_and_shows_only_exported_metrics():
    import json

    dashboard = json.loads((K8S / "grafana" / "onetower-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for e in exprs for name in re.findall(r"\bonetower_[a-z_]+", e)}
    assert used - _exported_names() == set()
    shown = {re.sub(r"_(bucket|sum|count)$", "", name) for name in used}  # a histogram's series, by its family name
    assert {m.describe()[0].name for m in (metrics.LIVE_RECALL, metrics.LIVE_RECALL_RANK, metrics.LIVE_RECALL_VECTOR_LAG,
                                           metrics.FRESHNESS, metrics.LAG)} <= shown
