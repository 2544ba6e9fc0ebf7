"""Render a kustomization directory to Kubernetes resources, in Python.

Hand-written on purpose: the tests must render the overlays where no ``kustomize`` binary exists
(CI images, laptops without kubectl), and PyPI has no maintained Python port of kustomize (the
``kustomize`` package there only generates YAML from Python classes).  It implements exactly the
features used under ``k8s/`` and refuses anything else with a clear error, so a new feature cannot
be silently mis-rendered.  Where ``kustomize`` or ``kubectl`` is installed, the tests check that both
renderings are identical.

Features: ``resources`` (files and directories), ``configMapGenerator`` / ``secretGenerator``
(``envs``, ``files``, ``literals``; kustomize's content-hash name suffix, with references in pod
specs renamed), strategic-merge ``patches`` (by kind and name; ``path`` or inline ``patch``),
``namespace``, ``labels`` (metadata only) and ``images``.

Usage: ``python k8s/render.py k8s/overlays/cpu`` prints the YAML (``--python`` forces this renderer).
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from core.errors import OnetowerError

Resource = dict[str, Any]

SUPPORTED_KEYS = {
    "apiVersion", "kind", "resources", "configMapGenerator", "secretGenerator",
    "patches", "namespace", "labels", "images",
}
CLUSTER_SCOPED = {
    "Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
    "PersistentVolume", "StorageClass", "PriorityClass",
}
# Strategic merge: lists merged by these keys (as in the Kubernetes API types); other lists replace.
MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "env": "name", "envFrom": None,
    "volumes": "name", "volumeMounts": "mountPath", "ports": "containerPort",
    "imagePullSecrets": "name",
}


class KustomizeError(OnetowerError, ValueError):
    """A kustomization this renderer cannot render (unsupported feature or bad input)."""


def load_yaml_docs(path: Path) -> list[Resource]:
    with path.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise KustomizeError(f"{path}: every document needs kind and metadata")
    return docs


# --- generators -------------------------------------------------------------------------------

def _env_file(path: Path) -> dict[str, str]:
    """kustomize's env-file rules: skip blanks and '#' lines, split at the first '=', no unquoting."""
    out: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.lstrip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise KustomizeError(f"{path}:{n}: expected KEY=VALUE (values from the environment are not supported)")
        key, value = line.split("=", 1)
        out[key] = value
    return out


def _generator_data(spec: dict, root: Path) -> dict[str, str]:
    unknown = set(spec) - {"name", "envs", "files", "literals", "type"}
    if unknown:
        raise KustomizeError(f"generator {spec.get('name')!r}: unsupported keys {sorted(unknown)}")
    data: dict[str, str] = {}
    for env in spec.get("envs", []):
        data.update(_env_file(root / env))
    for f in spec.get("files", []):
        if "=" in f:
            raise KustomizeError(f"generator {spec['name']!r}: key=path file sources are not supported")
        data[Path(f).name] = (root / f).read_text()
    for lit in spec.get("literals", []):
        key, value = lit.split("=", 1)
        data[key] = value
    return data


def _go_json(obj: Any) -> str:
    """The bytes Go's json.Marshal writes for maps of strings (sorted keys, HTML-safe escapes)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def name_hash(resource: Resource) -> str:
    """kustomize's suffix (api/hasher): sha256 of kind, type and data as JSON, first 10 hex, re-lettered.

    kustomize looks the name up with the single path element "metadata/name", which never matches,
    so it always hashes an empty name; this copies that to get the same suffixes.
    """
    encoded: dict[str, Any] = {"kind": resource["kind"], "name": "", "data": resource.get("data", "")}
    if resource["kind"] == "Secret":
        encoded["type"] = resource.get("type", "")
    digest = hashlib.sha256(_go_json(encoded).encode()).hexdigest()[:10]
    return digest.translate(str.maketrans({"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}))


def generate(kust: dict, root: Path) -> tuple[list[Resource], dict[tuple[str, str], str]]:
    """Generated ConfigMaps and Secrets, and the renames (kind, name) -> hashed name."""
    out, renames = [], {}
    for kind, key in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for spec in kust.get(key, []):
            data = _generator_data(spec, root)
            res: Resource = {"apiVersion": "v1", "kind": kind, "metadata": {"name": spec["name"]}}
            if kind == "Secret":
                res["type"] = spec.get("type", "Opaque")
                data = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
            res["data"] = data
            hashed = f"{spec['name']}-{name_hash(res)}"
            renames[(kind, spec["name"])] = hashed
            res["metadata"]["name"] = hashed
            out.append(res)
    return out, renames


def pod_specs(resource: Resource) -> list[dict]:
    """The pod specs inside a workload (Deployment, StatefulSet, Job... and CronJob)."""
    spec = resource.get("spec") or {}
    if resource["kind"] == "CronJob":
        spec = spec.get("jobTemplate", {}).get("spec", {})
    template = spec.get("template", {}).get("spec")
    return [template] if isinstance(template, dict) else []


def _rename_references(resources: list[Resource], renames: dict[tuple[str, str], str]) -> None:
    def new(kind: str, name: str) -> str:
        return renames.get((kind, name), name)

    for res in resources:
        for pod in pod_specs(res):
            for vol in pod.get("volumes", []):
                if "configMap" in vol:
                    vol["configMap"]["name"] = new("ConfigMap", vol["configMap"]["name"])
                if "secret" in vol:
                    vol["secret"]["secretName"] = new("Secret", vol["secret"]["secretName"])
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                for src in c.get("envFrom", []):
                    if "configMapRef" in src:
                        src["configMapRef"]["name"] = new("ConfigMap", src["configMapRef"]["name"])
                    if "secretRef" in src:
                        src["secretRef"]["name"] = new("Secret", src["secretRef"]["name"])
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {})
                    if "configMapKeyRef" in ref:
                        ref["configMapKeyRef"]["name"] = new("ConfigMap", ref["configMapKeyRef"]["name"])
                    if "secretKeyRef" in ref:
                        ref["secretKeyRef"]["name"] = new("Secret", ref["secretKeyRef"]["name"])


# --- strategic merge patches -------------------------------------------------------------------

def strategic_merge(target: Any, patch: Any, field: str = "") -> Any:
    """Merge ``patch`` into ``target`` the way kubectl/kustomize do for the fields we patch."""
    if isinstance(patch, dict) and isinstance(target, dict):
        if any(k.startswith("$") for k in patch):
            raise KustomizeError(f"patch directives ($patch, $setElementOrder...) are not supported at {field!r}")
        out = dict(target)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = strategic_merge(target.get(k), v, k) if k in target else copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(target, list) and MERGE_KEYS.get(field):
        key = MERGE_KEYS[field]
        existing = {item[key]: item for item in target}
        merged = [strategic_merge(existing[p[key]], p, field) if p[key] in existing else copy.deepcopy(p) for p in patch]
        patched = {p[key] for p in patch}
        # kustomize (kyaml) puts the patch's items first, then the untouched ones in their order.
        return merged + [item for item in target if item[key] not in patched]
    return copy.deepcopy(patch)


def apply_patches(resources: list[Resource], kust: dict, root: Path) -> None:
    for entry in kust.get("patches", []):
        if "target" in entry or "options" in entry:
            raise KustomizeError("only strategic-merge patches addressed by their own kind and name are supported")
        docs = load_yaml_docs(root / entry["path"]) if "path" in entry else [yaml.safe_load(entry["patch"])]
        for doc in docs:
            kind, name = doc["kind"], doc["metadata"]["name"]
            hits = [i for i, r in enumerate(resources) if r["kind"] == kind and r["metadata"]["name"] == name]
            if len(hits) != 1:
                raise KustomizeError(f"patch for {kind}/{name} matches {len(hits)} resources, expected 1")
            resources[hits[0]] = strategic_merge(resources[hits[0]], doc)


# --- transformers ----------------------------------------------------------------------------

def set_namespace(resources: list[Resource], namespace: str) -> None:
    for res in resources:
        if res["kind"] not in CLUSTER_SCOPED:
            res["metadata"]["namespace"] = namespace


def add_labels(resources: list[Resource], entries: list[dict]) -> None:
    for entry in entries:
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise KustomizeError("labels with includeSelectors/includeTemplates are not supported")
        for res in resources:
            res["metadata"].setdefault("labels", {}).update(entry["pairs"])


def split_image(image: str) -> tuple[str, str]:
    """('repo/name', ':tag' or '@digest' or '') — a registry port is not a tag."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def set_images(resources: list[Resource], entries: list[dict]) -> None:
    for res in resources:
        for pod in pod_specs(res):
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                name, suffix = split_image(c["image"])
                for e in entries:
                    if e["name"] != name:
                        continue
                    if "digest" in e:
                        suffix = "@" + e["digest"]
                    elif "newTag" in e:
                        suffix = ":" + str(e["newTag"])
                    c["image"] = e.get("newName", name) + suffix


# --- build ----------------------------------------------------------------------------------

def build(directory: str | Path) -> list[Resource]:
    """Render one kustomization directory (and the directories it includes)."""
    root = Path(directory)
    kust_path = root / "kustomization.yaml"
    if not kust_path.is_file():
        raise KustomizeError(f"{root}: no kustomization.yaml")
    kust = yaml.safe_load(kust_path.read_text()) or {}
    unknown = set(kust) - SUPPORTED_KEYS
    if unknown:
        raise KustomizeError(f"{kust_path}: unsupported fields {sorted(unknown)} (extend k8s/render.py or use kustomize)")

    resources: list[Resource] = []
    for entry in kust.get("resources", []):
        path = root / entry
        resources.extend(build(path) if path.is_dir() else load_yaml_docs(path))
    generated, renames = generate(kust, root)
    resources.extend(generated)
    _rename_references(resources, renames)
    apply_patches(resources, kust, root)
    if "namespace" in kust:
        set_namespace(resources, kust["namespace"])
    add_labels(resources, kust.get("labels", []))
    set_images(resources, kust.get("images", []))

    seen = set()
    for res in resources:
        ident = (res["apiVersion"].split("/")[0], res["kind"], res["metadata"].get("namespace"), res["metadata"]["name"])
        if ident in seen:
            raise KustomizeError(f"{root}: {ident[1]}/{ident[3]} defined twice")
        seen.add(ident)
    return resources


def kustomize_command() -> list[str] | None:
    """The installed kustomize (standalone, or the one built into kubectl), if any."""
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def build_with_kustomize(directory: str | Path) -> list[Resource]:
    cmd = kustomize_command()
    if cmd is None:
        raise KustomizeError("neither kustomize nor kubectl is installed")
    proc = subprocess.run([*cmd, str(directory)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise KustomizeError(f"{' '.join(cmd)} {directory}: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None]


def main(argv: list[str]) -> int:
    args = [a for a in argv if a != "--python"]
    if len(args) != 1:
        print("usage: python k8s/render.py [--python] DIR", file=sys.stderr)
        return 2
    try:
        docs = build(args[0]) if "--python" in argv or kustomize_command() is None else build_with_kustomize(args[0])
    except KustomizeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
