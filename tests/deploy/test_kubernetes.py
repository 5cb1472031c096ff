"""Kubernetes manifests and the Helm chart, validated offline: yamllint; kubernetes-validate (strict)
for core kinds; the vendored CRD schemas (deploy/schemas/) for LeaderWorkerSet, InferencePool and
HTTPRoute, with unknown fields refused as the API server's strict field validation does; and the
cross-object facts a deployment needs (selectors, ports, claims, drain timing, each accelerator's
device resource and the image's user). The chart is rendered by tests/deploy/gotemplate.py,
since no helm binary installs from PyPI or Debian."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.gotemplate import Chart, TemplateError, merge_values

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "textgen"
K8S_VERSION = "1.33.0"
CRD_SCHEMAS = {
    ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet"): "leaderworkerset.x-k8s.io_v1_leaderworkerset.json",
    ("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_v1_inferencepool.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway.networking.k8s.io_v1_httproute.json",
}
DEVICE = {"cpu": None, "cuda": "nvidia.com/gpu", "rocm": "amd.com/gpu", "xpu": "gpu.intel.com/i915",
          "gaudi": "habana.ai/gaudi", "tpu": "google.com/tpu", "inferentia": "aws.amazon.com/neuron"}


# -- validators ---------------------------------------------------------------------------------

def unknown_fields(instance: object, schema: dict, path: str = "") -> list[str]:
    """Fields the schema does not declare (the API server's strict field validation); objects
    with additionalProperties or x-kubernetes-preserve-unknown-fields accept any. `metadata` is
    ObjectMeta, which CRD schemas leave open (the API server checks it; `validate` does too)."""
    if isinstance(instance, dict) and schema.get("type") == "object":
        if schema.get("x-kubernetes-preserve-unknown-fields") or path.endswith("metadata"):
            return []
        props, extra = schema.get("properties", {}), schema.get("additionalProperties")
        found = []
        for key, value in instance.items():
            if key in props:
                found += unknown_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, f"{path}.{key}")
            elif not extra:
                found.append(f"{path}.{key}")
        return found
    if isinstance(instance, list) and isinstance(schema.get("items"), dict):
        return [f for i, item in enumerate(instance) for f in unknown_fields(item, schema["items"], f"{path}[{i}]")]
    return []


def crd_schema(doc: dict) -> dict | None:
    name = CRD_SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
    return json.loads((DEPLOY / "schemas" / name).read_text()) if name else None


def validate(doc: dict) -> None:
    """Raise on any problem: a CRD kind against its vendored schema, a core kind with
    kubernetes-validate; the pod templates inside a LeaderWorkerSet also as core PodTemplates."""
    schema = crd_schema(doc)
    if schema is None:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    jsonschema.Draft7Validator(schema).validate(doc)
    unknown = unknown_fields(doc, schema)
    assert not unknown, f"{doc['kind']}: unknown fields {unknown}"
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]},
                                 K8S_VERSION, strict=True)  # ObjectMeta
    if doc["kind"] == "LeaderWorkerSet":
        lwt = doc["spec"]["leaderWorkerTemplate"]
        for template in (lwt.get("leaderTemplate"), lwt["workerTemplate"]):
            if template is not None:
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                              "metadata": {"name": "t"}, "template": template}, K8S_VERSION, strict=True)
    if doc["kind"] == "InferencePool":  # the CRD's CEL rule, which jsonschema cannot run
        ref = doc["spec"]["endpointPickerRef"]
        assert ref.get("kind", "Service") != "Service" or "port" in ref


# -- the objects --------------------------------------------------------------------------------

def plain_manifests() -> list[dict]:
    docs = []
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def chart_values(accelerator: str, **overrides: object) -> dict:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    values = merge_values(values, yaml.safe_load((CHART / f"values-{accelerator}.yaml").read_text()))
    return merge_values(values, overrides)


def rendered(accelerator: str, gateway: bool = True) -> list[dict]:
    return Chart(CHART).documents(chart_values(accelerator, inferenceGateway={"enabled": gateway}))


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


# -- tests --------------------------------------------------------------------------------------

def test_yamllint_passes_on_manifests_and_chart_values():
    files = sorted((DEPLOY / "kubernetes").glob("*.yaml")) + sorted(CHART.glob("*.yaml"))
    result = subprocess.run([sys.executable, "-m", "yamllint", "-c", str(DEPLOY / ".yamllint"), "-f", "parsable",
                             *map(str, files)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("accelerator", list(DEVICE))
def test_rendered_chart_passes_yamllint(accelerator, tmp_path):
    # as `helm template` prints them: each template's output trimmed, under a Source comment
    out = tmp_path / "rendered.yaml"
    out.write_text("".join(f"---\n# Source: textgen/templates/{name}\n{text.strip()}\n" for name, text in
                           Chart(CHART).render(chart_values(accelerator, inferenceGateway={"enabled": True})).items()
                           if text.strip()))
    result = subprocess.run([sys.executable, "-m", "yamllint", "-c", str(DEPLOY / ".yamllint"), "-f", "parsable",
                             str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout


def test_plain_manifests_validate():
    docs = plain_manifests()
    assert sorted(d["kind"] for d in docs) == ["Deployment", "HTTPRoute", "InferencePool", "LeaderWorkerSet",
                                                 "PersistentVolumeClaim", "Service", "Service"]
    for doc in docs:
        validate(doc)
    check_serving_objects(docs, "cuda", uid=1001)


@pytest.mark.parametrize("accelerator", list(DEVICE))
def test_chart_renders_valid_objects_per_accelerator(accelerator):
    docs = rendered(accelerator)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "HTTPRoute", "InferencePool",
                                                 "PersistentVolumeClaim", "Service"]
    for doc in docs:
        validate(doc)
    uid = re.findall(r"^USER (\d+)$", (DEPLOY / "docker" / f"Dockerfile.{accelerator}").read_text(), re.M)
    check_serving_objects(docs, accelerator, uid=int(uid[-1]) if uid else 0)


def test_chart_options_change_what_renders():
    docs = Chart(CHART).documents(chart_values("cuda", modelCache={"enabled": False}))
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Service"]
    (dep,) = by_kind(docs, "Deployment")
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["model-cache"] == {"name": "model-cache", "emptyDir": {}}
    docs = Chart(CHART).documents(chart_values("cpu", modelCache={"existingClaim": "shared-weights"},
                                               lifecycle={"shutdownTimeoutSeconds": 300}))
    (dep,) = by_kind(docs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert [v for v in spec["volumes"] if v["name"] == "model-cache"][0]["persistentVolumeClaim"] == \
        {"claimName": "shared-weights"}
    assert not by_kind(docs, "PersistentVolumeClaim") and spec["terminationGracePeriodSeconds"] == 320


def check_serving_objects(docs: list[dict], accelerator: str, uid: int) -> None:
    (dep,) = by_kind(docs, "Deployment")
    pod = dep["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (container,) = pod["spec"]["containers"]
    assert container["image"].endswith(f":{accelerator}")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 80}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MODEL_ID"] and "SHUTDOWN_TIMEOUT" in env
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["spec"]["terminationGracePeriodSeconds"] > int(pre_stop[1]) + int(env["SHUTDOWN_TIMEOUT"])
    device = DEVICE[accelerator]
    res = container["resources"]
    if device:
        assert res["limits"][device] == res["requests"][device] >= 1
    assert not [k for k in res.get("limits", {}) if "/" in k and k != device]
    security = pod["spec"].get("securityContext", {})
    assert security.get("runAsUser", 0) == uid and security.get("runAsNonRoot", False) == (uid != 0)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]} == {"/data": "model-cache",
                                                                             "/dev/shm": "shm"}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    claim = volumes["model-cache"]["persistentVolumeClaim"]["claimName"]
    assert claim in {p["metadata"]["name"] for p in by_kind(docs, "PersistentVolumeClaim")}
    service = next(s for s in by_kind(docs, "Service") if s["spec"]["selector"].items() <= labels.items())
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    (pool,) = by_kind(docs, "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [80]
    (route,) = by_kind(docs, "HTTPRoute")
    (backend,) = route["spec"]["rules"][0]["backendRefs"]
    assert (backend["group"], backend["kind"], backend["name"]) == ("inference.networking.k8s.io", "InferencePool",
                                                                    pool["metadata"]["name"])


def test_leaderworkerset_wires_torchrun_rendezvous():
    (lws,) = by_kind(plain_manifests(), "LeaderWorkerSet")
    lwt = lws["spec"]["leaderWorkerTemplate"]
    for template in (lwt["leaderTemplate"], lwt["workerTemplate"]):
        (c,) = template["spec"]["containers"]
        script = c["args"][0]
        for var in ("MASTER_ADDR=\"$LWS_LEADER_ADDRESS\"", "NODE_RANK=\"$LWS_WORKER_INDEX\"",
                    "WORLD_SIZE=\"$((LWS_GROUP_SIZE * NPROC_PER_NODE))\"", "NUM_SHARD=", "exec textgen-entrypoint"):
            assert var in script, var
        env = {e["name"]: e["value"] for e in c["env"]}
        assert env["MASTER_PORT"] == "29500" and int(env["NPROC_PER_NODE"]) == c["resources"]["limits"]["nvidia.com/gpu"]
    leader = lwt["leaderTemplate"]["spec"]["containers"][0]
    assert leader["readinessProbe"]["httpGet"]["path"] == "/health"
    docs = plain_manifests()
    (svc,) = [s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "textgen-tp16"]
    assert svc["spec"]["selector"]["textgen.io/role"] == "leader"
    # the single-node Deployment's Service and InferencePool must not pick the group's worker pods
    worker_labels = lwt["workerTemplate"]["metadata"]["labels"]
    for selector in ([s["spec"]["selector"] for s in by_kind(docs, "Service") if s is not svc]
                     + [p["spec"]["selector"]["matchLabels"] for p in by_kind(docs, "InferencePool")]):
        assert not selector.items() <= worker_labels.items(), selector


@pytest.mark.parametrize("breakage", ["typo", "wrong type", "missing required", "cel rule", "core typo"])
def test_validators_reject_broken_objects(breakage):
    docs = plain_manifests()
    lws, pool, dep = by_kind(docs, "LeaderWorkerSet")[0], by_kind(docs, "InferencePool")[0], by_kind(docs, "Deployment")[0]
    if breakage == "typo":
        lws["spec"]["leaderWorkerTemplate"]["sizes"] = 2
        doc = lws
    elif breakage == "wrong type":
        lws["spec"]["leaderWorkerTemplate"]["size"] = "two"
        doc = lws
    elif breakage == "missing required":
        del pool["spec"]["targetPorts"]
        doc = pool
    elif breakage == "cel rule":
        del pool["spec"]["endpointPickerRef"]["port"]
        doc = pool
    else:
        dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
        doc = dep
    with pytest.raises((AssertionError, jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(doc)


def test_renderer_refuses_what_it_does_not_implement(tmp_path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "Chart.yaml").write_text("name: t\nversion: 1\nappVersion: '1'\n")
    (tmp_path / "templates" / "a.yaml").write_text("x: {{ .Values.a | upper }}\n")
    with pytest.raises(TemplateError, match="upper"):
        Chart(tmp_path).render({"a": "b"})
    (tmp_path / "templates" / "a.yaml").write_text("x: {{ .Values.missing }}\n")
    with pytest.raises(TemplateError, match="missing"):
        Chart(tmp_path).render({"a": "b"})
    (tmp_path / "templates" / "a.yaml").write_text("a:\n  {{- if .Values.on }}\n  b: {{ .Values.n | quote }}\n"
                                                   "  {{- else }}\n  c: 1\n  {{- end }}\n")
    assert Chart(tmp_path).render({"on": True, "n": 7})["a.yaml"] == 'a:\n  b: "7"\n'
    assert Chart(tmp_path).render({"on": False, "n": 7})["a.yaml"] == "a:\n  c: 1\n"
