"""launchers/kubernetes offline: the RayCluster and the RayJob against KubeRay's published CRD schemas (the v1
openAPIV3Schema of ray.io_rayclusters.yaml / ray.io_rayjobs.yaml at KubeRay v1.7.0, stored under
tests/data/kuberay/v1.7.0 with their source), broken copies refused, the recipe's own invariants (autoscaling from
0, token auth, the fill-ins that must agree), and the Dockerfile's Ray, Python and torch against pyproject.toml.
No cluster, no network, no Docker: what needs the real thing is listed in docs/how-to/kubernetes.md."""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
LAUNCHER = REPO / "launchers" / "kubernetes"
KUBERAY_VERSION = "v1.7.0"
SCHEMAS = Path(__file__).resolve().parent / "data" / "kuberay" / KUBERAY_VERSION
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

# ---- Kubernetes structural schemas as JSON Schema (Draft 7) ----
# What the API server does beyond plain JSON Schema, for the parts these manifests use:
# - x-kubernetes-int-or-string: an integer or a string (resource quantities, ports); a float or a bool is refused.
# - unknown fields: an object with `properties` holds only those, unless x-kubernetes-preserve-unknown-fields
#   (kubectl's default --validate=strict refuses an unknown field; without it the server drops it silently, which
#   is worse: a misspelt enableInTreeAutoscaling would just not autoscale). So additionalProperties: false.
# - x-kubernetes-list-type map / set: items unique by their list-map-keys / unique.
# - the object's own metadata is `type: object` in a CRD; the server checks it as ObjectMeta (OBJECT_META below).
# - x-kubernetes-validations (CEL rules), x-kubernetes-map-type, format: not evaluated here (the rules concern
#   fields these manifests do not set: managedBy, deletionStrategy, gcsFaultToleranceOptions).

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        # KubeRay puts the RayCluster's name into label values and service names: 63 characters at most.
        "name": {"type": "string", "pattern": DNS_LABEL, "maxLength": 63},
        "namespace": {"type": "string", "pattern": DNS_LABEL},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def structural(node, strict: bool = True):
    """A copy of a Kubernetes structural schema node with unknown fields refused (see above)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: structural(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = structural(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural(sub) for sub in value]
        else:
            out[key] = value
    if (strict and node.get("type") == "object" and "properties" in node and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _int_or_string(validator, value, instance, schema):
    if value and (isinstance(instance, bool) or not isinstance(instance, (int, str))):
        yield jsonschema.ValidationError(f"{instance!r} is neither an integer nor a string (int-or-string)")


def _list_type(validator, value, instance, schema):
    if not validator.is_type(instance, "array"):
        return
    if value == "set":
        seen = [json.dumps(item, sort_keys=True) for item in instance]
        if len(seen) != len(set(seen)):
            yield jsonschema.ValidationError(f"duplicate items in a list of type set: {instance!r}")
    elif value == "map":
        keys = schema.get("x-kubernetes-list-map-keys", [])
        defaults = {k: (schema.get("items", {}).get("properties", {}).get(k) or {}).get("default") for k in keys}
        seen = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k, defaults[k])) for k in keys)
            if key in seen:
                yield jsonschema.ValidationError(f"duplicate {dict(zip(keys, key))} in a list of type map")
            seen.add(key)


K8sValidator = jsonschema.validators.extend(jsonschema.Draft7Validator, {
    "x-kubernetes-int-or-string": _int_or_string, "x-kubernetes-list-type": _list_type})


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    schema = structural(json.loads((SCHEMAS / f"{kind}.openapi.json").read_text()))
    schema["properties"]["metadata"] = OBJECT_META
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    schema["properties"]["apiVersion"] = {"const": "ray.io/v1"}
    schema["properties"]["kind"] = {"const": {"raycluster": "RayCluster", "rayjob": "RayJob"}[kind]}
    K8sValidator.check_schema(schema)
    return K8sValidator(schema)


def errors(kind: str, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in sorted(crd_validator(kind).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def documents(path: Path) -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), f"{path.name}: one document of each kind"
    return by_kind


def cluster() -> dict:
    return documents(LAUNCHER / "raycluster.yaml")["RayCluster"]


def rayjob() -> dict:
    return documents(LAUNCHER / "rayjob.yaml")["RayJob"]


def ray_pin() -> str:
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    (ray,) = [r for r in reqs if r.name == "ray"]
    (spec,) = ray.specifier
    assert spec.operator == "==", "raydllm pins one Ray version"
    return spec.version


# ---- the manifests against the CRD schemas ----

def test_schemas_are_kuberay_crds_of_the_named_version():
    readme = (SCHEMAS / "README.md").read_text()
    assert f"**{KUBERAY_VERSION}**" in readme and "Apache License, Version 2.0" in readme
    for kind in ("raycluster", "rayjob"):
        schema = json.loads((SCHEMAS / f"{kind}.openapi.json").read_text())
        assert {"apiVersion", "kind", "metadata", "spec", "status"} <= set(schema["properties"])
    # the version the README, the how-to page and both manifests name is the one checked here
    for path in (REPO / "README.md", REPO / "docs" / "how-to" / "kubernetes.md", LAUNCHER / "raycluster.yaml",
                 LAUNCHER / "rayjob.yaml"):
        assert f"KubeRay {KUBERAY_VERSION}" in path.read_text(), path
    assert f"--version {KUBERAY_VERSION.lstrip('v')}" in (REPO / "docs" / "how-to" / "kubernetes.md").read_text()


@pytest.mark.parametrize("kind, load", [("raycluster", cluster), ("rayjob", rayjob)])
def test_manifest_validates_against_the_crd_schema(kind, load):
    assert errors(kind, load()) == []


BROKEN_CLUSTER = {
    "a count as a string": (lambda c: c["spec"]["workerGroupSpecs"][0].update(maxReplicas="4"), "maxReplicas"),
    "a rayStartParams value not a string": (lambda c: c["spec"]["headGroupSpec"]["rayStartParams"].update(
        {"num-cpus": 0}), "rayStartParams/num-cpus"),
    "a required field missing (groupName)": (lambda c: c["spec"]["workerGroupSpecs"][0].pop("groupName"),
                                              "workerGroupSpecs/0"),
    "a required field missing (the head's template)": (lambda c: c["spec"]["headGroupSpec"].pop("template"),
                                                        "headGroupSpec"),
    "a misspelt field": (lambda c: c["spec"].update(enableInTreeAutoScaling=c["spec"].pop("enableInTreeAutoscaling")),
                         "spec"),
    "a float quantity": (lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]
                         ["limits"].update(cpu=0.5), "limits/cpu"),
    "a quantity that is no quantity": (lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
                                       ["resources"]["limits"].update(memory="lots"), "limits/memory"),
    "an unknown auth mode": (lambda c: c["spec"]["authOptions"].update(mode="password"), "authOptions/mode"),
    "two containers of one name": (lambda c: c["spec"]["headGroupSpec"]["template"]["spec"]["containers"].__setitem__(
        1, {**c["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1], "name": "ray-head"}), "containers"),
    "a toleration as a string": (lambda c: c["spec"]["workerGroupSpecs"][0]["template"]["spec"].update(
        tolerations=["nvidia.com/gpu"]), "tolerations/0"),
    "an upper-case name": (lambda c: c["metadata"].update(name="RayDLLM"), "metadata/name"),
}
BROKEN_JOB = {
    "the entrypoint as a list": (lambda j: j["spec"].update(entrypoint=["raydllm", "tune"]), "entrypoint"),
    "a selector value not a string": (lambda j: j["spec"]["clusterSelector"].update({"ray.io/cluster": 1}),
                                      "clusterSelector"),
    "a misspelt field": (lambda j: j["spec"].update(clusterSelecter=j["spec"].pop("clusterSelector")), "spec"),
    "the wrong apiVersion": (lambda j: j.update(apiVersion="ray.io/v1alpha2"), "apiVersion"),
}


@pytest.mark.parametrize("kind, load, break_it, where", [
    *[pytest.param("raycluster", cluster, f, w, id=f"raycluster: {n}") for n, (f, w) in BROKEN_CLUSTER.items()],
    *[pytest.param("rayjob", rayjob, f, w, id=f"rayjob: {n}") for n, (f, w) in BROKEN_JOB.items()],
])
def test_broken_manifest_is_refused(kind, load, break_it, where):
    doc = copy.deepcopy(load())
    break_it(doc)
    found = errors(kind, doc)
    assert found, "a broken manifest passed the schema"
    assert any(where in e for e in found), found


def test_the_rayjobs_cluster_spec_is_checked_too():
    """The RayJob schema embeds the whole RayClusterSpec: the same cluster as a RayJob's own rayClusterSpec passes,
    and a broken one does not (the validator reaches that deep, not just the top)."""
    job = copy.deepcopy(rayjob())
    job["spec"].pop("clusterSelector")
    job["spec"]["rayClusterSpec"] = copy.deepcopy(cluster()["spec"])
    assert errors("rayjob", job) == []
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["minReplicas"] = "0"
    assert any("rayClusterSpec/workerGroupSpecs/0/minReplicas" in e for e in errors("rayjob", job))


def test_the_shared_volume_claim():
    claim = documents(LAUNCHER / "raycluster.yaml")["PersistentVolumeClaim"]
    assert claim["apiVersion"] == "v1" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert re.fullmatch(r"[0-9]+(Gi|Ti)", claim["spec"]["resources"]["requests"]["storage"])
    pods = [cluster()["spec"]["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in cluster()["spec"]["workerGroupSpecs"]]
    for pod in pods:
        assert pod["securityContext"]["fsGroup"] == 100, "the image's user ray (group users) writes the volume"
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims == {claim["metadata"]["name"]}


# ---- what KubeRay checks when it reconciles (its validation.go), and this recipe's own invariants ----

def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_the_cluster_autoscales_gpu_pods_from_zero_with_token_auth():
    spec = cluster()["spec"]
    assert spec["rayVersion"] == ray_pin()
    assert Version(spec["rayVersion"]) >= Version("2.52.0"), "KubeRay: authOptions token needs Ray >= 2.52"
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["enableInTreeAutoscaling"] is True
    (gpu,) = spec["workerGroupSpecs"]
    assert gpu["minReplicas"] == 0 and gpu.get("replicas", 0) == 0 and gpu["maxReplicas"] >= 1
    pod = gpu["template"]["spec"]
    assert pod["nodeSelector"] and pod["tolerations"], "GPU node selector and tolerations (fill-ins)"
    (worker,) = pod["containers"]
    limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
    assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == 8
    # gsm8k.yaml's trial = 8 workers x 8 CPUs x 1 GPU on one pod, with the space's accelerator type
    space = yaml.safe_load((REPO / "search_spaces" / "gsm8k.yaml").read_text())["resources"]
    assert int(limits["cpu"]) >= space["workers"] * space["cpus_per_worker"]
    assert limits["nvidia.com/gpu"] >= space["workers"]
    assert gpu["resources"] == {f"accelerator_type:{space['accelerator_type']}": "1"}
    # NCCL's /dev/shm: a memory-backed emptyDir mounted there
    shm = [v["name"] for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
    assert {"mountPath": "/dev/shm", "name": shm[0]} in worker["volumeMounts"]
    # trials live on the head, at most one per GPU pod (cluster.yaml's trial_slot = max_workers)
    head = spec["headGroupSpec"]
    assert head["resources"] == {"CPU": "0", "trial_slot": str(gpu["maxReplicas"])}


def test_one_image_everywhere_and_the_head_service_serves_mlflow():
    spec = cluster()["spec"]
    head_pod = spec["headGroupSpec"]["template"]["spec"]
    containers = head_pod["containers"] + [
        c for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert len({c["image"] for c in containers}) == 1
    ray_head, mlflow = head_pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in ray_head["ports"]}
    # KubeRay builds the head service from the Ray container's ports only: Ray's defaults must stay listed
    assert ports == {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080, "mlflow": 5000}
    assert "--port 5000" in mlflow["args"][0] and "mlflow server" in mlflow["args"][0]
    tracking = _env(ray_head)["MLFLOW_TRACKING_URI"]
    assert tracking == f"http://{cluster()['metadata']['name']}-head-svc:5000"
    assert "raydllm-head-svc*" in mlflow["args"][0], "MLflow's --allowed-hosts admits the head service's name"
    for group in spec["workerGroupSpecs"]:
        assert _env(group["template"]["spec"]["containers"][0]) == _env(ray_head)


def test_mlflow_admits_the_head_service_and_the_port_forward():
    """MLflow's --allowed-hosts replaces its default (localhost and private IPs): the trial workers' Host header is
    the head service's name, the port-forward's is 127.0.0.1 / localhost. Checked with MLflow's own matcher."""
    from mlflow.server.security_utils import is_allowed_host_header

    mlflow = cluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1]
    args = shlex.split(mlflow["args"][0])
    allowed = args[args.index("--allowed-hosts") + 1].split(",")
    service = f"{cluster()['metadata']['name']}-head-svc"
    for host in (f"{service}:5000", f"{service}.default.svc.cluster.local:5000", "127.0.0.1:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example:5000")
    # the kubelet's readiness probe sends the pod IP as its Host: the probe must be a path MLflow exempts
    from mlflow.server.security_utils import is_health_endpoint

    assert is_health_endpoint(mlflow["readinessProbe"]["httpGet"]["path"])


def test_the_rayjob_runs_raydllm_tune_on_that_cluster():
    from raydllm.cli.app import build_parser

    job, ray_cluster = rayjob()["spec"], cluster()
    assert job["clusterSelector"] == {"ray.io/cluster": ray_cluster["metadata"]["name"]}
    # KubeRay refuses these with a clusterSelector; a rayClusterSpec beside it would be ignored
    assert job.get("submissionMode", "K8sJobMode") != "SidecarMode"
    assert not job.get("suspend") and not job.get("backoffLimit") and "rayClusterSpec" not in job
    assert "shutdownAfterJobFinishes" not in job, "the cluster (MLflow with it) outlives the sweep"
    argv = shlex.split(job["entrypoint"])
    assert argv[:2] == ["raydllm", "tune"]
    args = build_parser().parse_args(argv[1:])  # raydllm's own CLI accepts every flag
    assert args.task == "gsm8k"
    head = ray_cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert args.tracking_uri == _env(head)["MLFLOW_TRACKING_URI"]
    assert args.storage == _env(head)["RAYDLLM_STORAGE"]
    for group in [ray_cluster["spec"]["headGroupSpec"], *ray_cluster["spec"]["workerGroupSpecs"]]:
        mounts = [m["mountPath"] for m in group["template"]["spec"]["containers"][0]["volumeMounts"]]
        assert any(args.storage.startswith(m + "/") for m in mounts), "--storage is on the shared volume"


def test_rays_kuberay_autoscaler_reads_a_gpu_group_that_holds_a_gsm8k_trial():
    """Ray 2.60's own reader of a RayCluster (what the in-tree autoscaler plans with) sees a head with 0 CPUs and
    4 trial slots, and a GPU group of 0 to 4 pods that one gsm8k.yaml trial (8 workers of 8 CPUs, 1 GPU and
    the A100-80G type each) fits on, one pod per trial (raydllm's own placement rule: STRICT_PACK)."""
    from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr

    from raydllm.core.config import validate
    from raydllm.sweep import cluster as ray_nodes
    from raydllm.sweep.search_space import base_raw, load_spec
    from raydllm.sweep.train import worker_bundle

    ray_cr = copy.deepcopy(cluster())
    ray_cr["metadata"]["namespace"] = "default"  # what the API server fills in
    config = _derive_autoscaling_config_from_ray_cr(ray_cr)
    types = config["available_node_types"]
    head, gpu = types.pop(config["head_node_type"]), types.pop("gpu-a100-80gb")
    assert types == {}
    assert head["resources"]["CPU"] == 0 and head["resources"]["trial_slot"] == 4
    assert (gpu["min_workers"], gpu["max_workers"]) == (0, 4)
    assert gpu["resources"]["GPU"] == 8 and gpu["resources"]["CPU"] == 90
    assert gpu["resources"]["accelerator_type:A100-80G"] == 1
    spec = load_spec(REPO / "search_spaces" / "gsm8k.yaml")
    bundle = worker_bundle(validate(base_raw(spec)), spec.resources.use_gpu)
    assert bundle["GPU"] == 1 and "accelerator_type:A100-80G" in bundle
    gpu_pods = [ray_nodes.NodeShape("gpu-a100-80gb", gpu["resources"], gpu["max_workers"])]
    assert ray_nodes.placement(bundle, spec.resources.workers, gpu_pods) == "STRICT_PACK"
    # the head alone can hold no worker: until the autoscaler adds a GPU pod, raydllm's check can only warn
    assert ray_nodes.placement(bundle, 1, [ray_nodes.NodeShape("head", head["resources"], 1)]) is None


def test_every_fill_in_is_listed_in_the_header():
    """Each `# fill-in N` below the header is item N of the header's list, and every YOUR_ placeholder is named
    there: what to fill in is all in one place, as in cluster.yaml."""
    for path in (LAUNCHER / "raycluster.yaml", LAUNCHER / "rayjob.yaml"):
        lines = path.read_text().splitlines()
        end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
        header, body = "\n".join(lines[:end]), "\n".join(lines[end:])
        listed = {int(n) for n in re.findall(r"^#\s+(\d+)\. ", header, re.M)}
        marked = {int(n) for line in body.splitlines() if "fill-in" in line
                  for n in re.findall(r"\d+", line.split("fill-in", 1)[1].split(":")[0])}
        assert marked and marked <= listed, (path.name, marked, listed)
        assert set(re.findall(r"YOUR_[A-Z_]+", body)) <= set(re.findall(r"YOUR_[A-Z_]+", header)), path.name


# ---- the image ----

def _dockerfile() -> str:
    return (LAUNCHER / "Dockerfile").read_text()


def test_the_image_matches_the_pins():
    (base,) = re.findall(r"^FROM\s+(\S+)", _dockerfile(), re.M)
    m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3)(?P<minor>\d+)-(?P<platform>cu\d+|gpu)", base)
    assert m, f"{base}: Ray's GPU image, rayproject/ray:<ray>-py3xx-cuXXX"
    assert m["ray"] == ray_pin() == cluster()["spec"]["rayVersion"]
    python = f"{m['py']}.{m['minor']}"
    requires = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert python in requires
    # the Python CI tests: the lowest one requires-python allows
    assert [s.version for s in requires if s.operator == ">="] == [python]
    (torch_req,) = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if Requirement(r).name == "torch"]
    (torch_pin,) = re.findall(r'"torch==([^"]+)"', _dockerfile())
    assert torch_pin in torch_req.specifier
    assert f"torch=={torch_pin}" in (REPO / ".ci" / "run").read_text(), "the torch CI installs"


def test_the_image_is_raydllm_at_the_checkouts_commit():
    text = _dockerfile()
    copied = set()
    for line in re.findall(r"^COPY\s+(.+)$", text, re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        copied |= set(parts[:-1])
    # the files pip builds raydllm from; on AWS cluster.yaml mounts the whole checkout, which holds them all
    assert copied == {"pyproject.toml", "README.md", "raydllm", "search_spaces"}
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    assert cluster["file_mounts"]["~/raydllm"] == "." and not copied & set(cluster["rsync_exclude"])
    assert re.search(r"^RUN pip install --no-cache-dir \. ", text, re.M), "raydllm from the checkout, not an index"
    assert "ARG RAYDLLM_COMMIT" in text
    assert 'org.opencontainers.image.revision="${RAYDLLM_COMMIT}"' in text
    ignore = [line for line in (LAUNCHER / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "**" and {f"!{p}" for p in copied} <= set(ignore), "the build context is those files only"
