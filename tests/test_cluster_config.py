"""cluster.yaml checked offline with Ray's own autoscaler config code (no AWS credentials, no network).

What `ray up` does with a config, in order (ray/autoscaler/_private/commands.py `_bootstrap_config`):
  prepare_config (merge with aws/defaults.yaml, merge setup commands, docker checks, per-type min/max workers)
  -> validate_config (JSON schema ray-schema.json + head/worker consistency)
  -> provider.fillout_available_node_types_resources + bootstrap_config   <- these call AWS; not run here.
On the head, the autoscaler (v2 by default under `ray up` since Ray 2.50) re-reads the file through
`AutoscalingConfig`, which runs prepare_config + validate_config again; that is checked here too.
"""
from __future__ import annotations

import copy
import json
import os
import re
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = sorted(p for p in (REPO / "cluster.yaml", REPO / "cluster-gcp.yaml") if p.exists())
GPU_INSTANCES = {"p4de.24xlarge": 8, "p4d.24xlarge": 8}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def ray_up_checks(raw: dict) -> dict:
    """The offline part of `ray up`'s config handling; raises on a bad config, returns the prepared one."""
    jsonschema.validate(raw, _schema())  # the raw file itself: unknown keys and wrong types fail here
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    return prepared


def _write(tmp_path: Path, cfg: dict, name="broken.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _worker_types(cfg: dict) -> dict:
    return {k: v for k, v in cfg["available_node_types"].items() if k != cfg["head_node_type"]}


@pytest.fixture(params=CLUSTER_FILES, ids=lambda p: p.name)
def cluster_file(request) -> Path:
    return request.param


def test_cluster_yaml_exists():
    assert (REPO / "cluster.yaml").is_file()


def test_passes_ray_up_offline_checks(cluster_file):
    prepared = ray_up_checks(_load(cluster_file))
    # prepare_config filled what `ray up` needs from the provider defaults.
    assert "cluster_synced_files" in prepared and "auth" in prepared
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_passes_autoscaler_v2_config_reader(cluster_file):
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    raw = _load(cluster_file)
    cfg = AutoscalingConfig(copy.deepcopy(raw), skip_content_hash=True)
    assert cfg.get_head_node_type() == raw["head_node_type"]
    assert cfg.get_idle_timeout_s() == pytest.approx(raw["idle_timeout_minutes"] * 60)
    types = cfg.get_node_type_configs()
    for name in _worker_types(raw):
        assert types[name].min_worker_nodes == 0


def test_round_trip_through_a_file(cluster_file, tmp_path):
    # What `ray up` reads is the file: dump + reload (YAML anchors resolved) must still validate.
    path = _write(tmp_path, _load(cluster_file), "copy.yaml")
    ray_up_checks(_load(path))


# --- broken copies must be refused -------------------------------------------------------------------------------

def _break_unknown_top_level_key(cfg):
    cfg["idle_timeout_minuts"] = 5  # typo


def _break_unknown_node_type_key(cfg):
    worker = next(iter(_worker_types(cfg).values()))
    worker["min_worker"] = worker.pop("min_workers")  # typo


def _break_missing_head_node_type_entry(cfg):
    del cfg["available_node_types"][cfg["head_node_type"]]


def _break_head_node_type_points_nowhere(cfg):
    cfg["head_node_type"] = "ray.head.gpu"


def _break_fractional_resource(cfg):
    next(iter(_worker_types(cfg).values()))["resources"]["GPU"] = 0.5  # schema: integers only


def _break_unknown_docker_key(cfg):
    cfg["docker"]["imag"] = cfg["docker"]["image"]


def _break_missing_node_config(cfg):
    del next(iter(_worker_types(cfg).values()))["node_config"]


def _break_min_workers_above_max(cfg):
    cfg["max_workers"] = 1
    for worker in _worker_types(cfg).values():
        worker["min_workers"] = 1
        worker["max_workers"] = max(worker["max_workers"], 1)


def _break_missing_provider(cfg):
    del cfg["provider"]


BREAKERS = [  # (how to break it, what Ray's refusal says)
    (_break_unknown_top_level_key, r"'idle_timeout_minuts' was unexpected"),
    (_break_unknown_node_type_key, r"'min_worker' was unexpected"),
    (_break_missing_head_node_type_entry, r"`head_node_type` must be one of `available_node_types`"),
    (_break_head_node_type_points_nowhere, r"`head_node_type` must be one of `available_node_types`"),
    (_break_fractional_resource, r"0\.5 is not of type 'integer'"),
    (_break_unknown_docker_key, r"'imag' was unexpected"),
    (_break_missing_node_config, r"'node_config' is a required property"),
    (_break_min_workers_above_max, r"global `max_workers` is smaller than the sum of `min_workers`"),
    (_break_missing_provider, r"'provider' is a required property"),
]


@pytest.mark.parametrize("breaker,message", BREAKERS, ids=[b.__name__.removeprefix("_break_") for b, _ in BREAKERS])
def test_broken_copy_is_refused(cluster_file, tmp_path, breaker, message):
    cfg = _load(cluster_file)
    breaker(cfg)
    path = _write(tmp_path, cfg)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=message):
        ray_up_checks(_load(path))


def test_missing_head_node_type_key_is_defaulted_by_ray(cluster_file, tmp_path):
    """Deleting only the `head_node_type` key is NOT an error for Ray: prepare_config takes the provider default
    ("ray.head.default"), so our head type must carry exactly that name for the config to stay correct."""
    cfg = _load(cluster_file)
    assert cfg["head_node_type"] == "ray.head.default"
    del cfg["head_node_type"]
    prepared = ray_up_checks(_load(_write(tmp_path, cfg)))
    assert prepared["head_node_type"] == "ray.head.default"


# --- structural facts --------------------------------------------------------------------------------------------

def test_head_is_cpu_only(cluster_file):
    cfg = _load(cluster_file)
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    assert head.get("min_workers", 0) == 0 and head.get("max_workers", 0) == 0
    if cfg["provider"]["type"] == "aws":
        assert not head["node_config"]["InstanceType"].startswith(("p", "g")), "head should be a CPU instance"


def test_gpu_workers_scale_from_zero(cluster_file):
    cfg = _load(cluster_file)
    workers = _worker_types(cfg)
    assert workers, "no worker node types"
    for name, worker in workers.items():
        assert worker.get("min_workers", 0) == 0, f"{name}: min_workers must be 0 (no idle GPU nodes)"
        assert worker["resources"]["GPU"] > 0, f"{name}: declare GPUs so the autoscaler can plan"
    assert max(w["max_workers"] for w in workers.values()) >= 1, "no GPU node type can be launched"
    assert sum(w.get("min_workers", 0) for w in workers.values()) <= cfg["max_workers"]


def test_aws_gpu_instance_types(cluster_file):
    cfg = _load(cluster_file)
    if cfg["provider"]["type"] != "aws":
        pytest.skip("AWS only")
    workers = _worker_types(cfg)
    types = {w["node_config"]["InstanceType"] for w in workers.values()}
    assert "p4de.24xlarge" in types and "p4d.24xlarge" in types
    for name, worker in workers.items():
        gpus = GPU_INSTANCES[worker["node_config"]["InstanceType"]]
        assert worker["resources"]["GPU"] == gpus, name
        assert "IamInstanceProfile" in worker["node_config"], f"{name}: workers need S3 access for checkpoints"
    spot = [w for w in workers.values() if w["node_config"].get("InstanceMarketOptions")]
    assert spot and all(w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for w in spot)
    default_80gb = workers["gpu_a100_80gb"]
    assert default_80gb["node_config"]["InstanceType"] == "p4de.24xlarge" and default_80gb["max_workers"] >= 1


def test_idle_timeout_set(cluster_file):
    cfg = _load(cluster_file)
    assert 0 < cfg["idle_timeout_minutes"] <= 30


def test_docker_image_matches_installed_ray(cluster_file):
    cfg = _load(cluster_file)
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    images = {cfg["docker"][k] for k in ("image", "head_image", "worker_image") if k in cfg["docker"]}
    assert images
    for image in images:
        m = re.fullmatch(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-(?P<py>py3\d+)-(?P<platform>cpu|gpu|cu\d+)", image)
        assert m, f"unexpected image tag {image!r}"
        assert m["ray"] == ray.__version__, f"{image}: Ray version differs from installed ray {ray.__version__}"
        assert m["py"] == py, f"{image}: Python {m['py']} differs from this environment's {py}"
    worker_image = cfg["docker"].get("worker_image", cfg["docker"]["image"])
    assert worker_image.endswith(("-gpu",)) or re.search(r"-cu\d+$", worker_image)


def _all_commands(cfg: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands")
    return [c for k in keys for c in cfg.get(k) or []]


def _pip_installs(cfg: dict) -> list[list[str]]:
    """The arguments of every `pip install` on any node (split at shell separators)."""
    out = []
    for command in _all_commands(cfg):
        for part in re.split(r"[;&|]+|\bthen\b|\belse\b|\bfi\b", command):
            words = part.replace('"', " ").replace("'", " ").split()
            if "pip" in words and "install" in words:
                out.append(words[words.index("install") + 1:])
    return out


def _checkout_mount(cfg: dict) -> str:
    """The remote folder the checkout (local `.`) is mounted at."""
    remotes = [remote for remote, local in cfg["file_mounts"].items() if local.rstrip("/") in (".", "./")]
    assert len(remotes) == 1, cfg["file_mounts"]
    return remotes[0]


def test_no_single_file_mount(cluster_file):
    """Docker bind-mounts each file_mounts entry; rsync replaces a changed file by a new inode, which a running
    container never sees (Ray keeps its own bootstrap files out of the bind mounts for this reason). Folders only:
    the checkout as one folder, and the token folder (the user makes it; git-ignored)."""
    cfg = _load(cluster_file)
    for remote, local in cfg["file_mounts"].items():
        path = REPO / local
        assert not path.is_file(), f"file_mounts {remote}: {local} is a single file"
        assert path.is_dir() or local.rstrip("/").removeprefix("./") in {
            line.strip().rstrip("/") for line in (REPO / ".gitignore").read_text().splitlines()}, (remote, local)
    assert _checkout_mount(cfg) == "~/raydllm"


def _make_checkout_with_local_junk(tmp_path: Path) -> Path:
    """A copy of the checkout's tracked files plus what a user's checkout also holds and no node may get."""
    import subprocess

    checkout = tmp_path / "checkout"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    for name in filter(None, files.stdout.split("\0")):
        source = REPO / name
        if source.is_file() or source.is_symlink():
            (checkout / name).parent.mkdir(parents=True, exist_ok=True)
            (checkout / name).symlink_to(os.readlink(source)) if source.is_symlink() else \
                (checkout / name).write_bytes(source.read_bytes())
    for junk in (".venv/bin/python", "mlflow.db", "runs.db", "raydllm_runs/sweep/checkpoint_000001/model.pt",
                 "mlruns/0/meta.yaml", ".ray-auth/auth_token", "build/lib/x.py", "raydllm/__pycache__/a.pyc"):
        (checkout / junk).parent.mkdir(parents=True, exist_ok=True)
        (checkout / junk).write_text("local only")
    return checkout


def test_checkout_mount_leaves_local_state_behind_and_builds(cluster_file, tmp_path):
    """What `ray up` copies for the checkout mount (rsync with Ray's own filter arguments built from the file's
    rsync_exclude / rsync_filter) has no .venv, database, checkpoint or token, and builds the raydllm wheel with
    its search spaces, from a temporary copy as setup_commands does."""
    import shutil
    import subprocess
    import zipfile

    from ray.autoscaler._private.command_runner import SSHCommandRunner

    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed (.ci/run installs it)")
    cfg = _load(cluster_file)
    checkout = _make_checkout_with_local_junk(tmp_path)
    options = {"rsync_exclude": cfg.get("rsync_exclude"), "rsync_filter": cfg.get("rsync_filter")}
    node = tmp_path / "node" / "raydllm"
    node.parent.mkdir()
    subprocess.run(["rsync", "-a", *SSHCommandRunner._create_rsync_filter_args(None, options),
                    f"{checkout}/", f"{node}/"], check=True, capture_output=True)
    copied = {str(p.relative_to(node)) for p in node.rglob("*") if p.is_file()}
    leaked = sorted(c for c in copied if c.split("/")[0] in {".venv", "raydllm_runs", "mlruns", ".ray-auth", "build"}
                    or c.endswith((".db", ".pyc")))
    assert not leaked, leaked
    assert "pyproject.toml" in copied and "raydllm/sweep/node_setup.py" in copied
    build = tmp_path / "build"
    shutil.copytree(node, build, symlinks=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(build)], check=True, capture_output=True)
    names = zipfile.ZipFile(next((tmp_path / "dist").glob("raydllm-*.whl"))).namelist()
    spaces = {p.name for p in (REPO / "search_spaces").glob("*.yaml")}
    assert {f"raydllm/search_spaces/{n}" for n in spaces} <= set(names), names
    assert {"raydllm/sweep/cluster.py", "raydllm/configs/paper.yaml"} <= set(names)


def test_no_node_installs_raydllm_from_a_package_index(cluster_file):
    """raydllm is not on any index: every node installs the checkout that file_mounts copied to it, from a
    temporary copy (pip builds in the folder it is given; the mounted one belongs to the host)."""
    cfg = _load(cluster_file)
    installs = _pip_installs(cfg)
    assert installs, "no pip install on the nodes"
    requirements = [w for args in installs for w in args if not w.startswith("-")]
    by_name = [w for w in requirements if re.fullmatch(r"raydllm(\[[^\]]*\])?([=<>~!].*)?", w)]
    assert not by_name, f"installs raydllm from an index: {by_name}"
    mount = _checkout_mount(cfg)
    install = next(c for c in cfg["setup_commands"] if "pip install" in c and mount in c)
    m = re.fullmatch(r'(?P<var>\w+)=\$\(mktemp -d\) && cp -r (?P<src>\S+)/\. "\$(?P=var)" && '
                     r'pip install -q "\$(?P=var)" .*&& rm -rf "\$(?P=var)"', install)
    assert m and m["src"] == mount, install
    assert not any(mount in args for args in installs), "pip must never be handed the mounted folder itself"


def test_torch_install_matches_the_node(cluster_file):
    """torch before raydllm, at the tested version: the CUDA build where a GPU is, the CPU build elsewhere."""
    cfg = _load(cluster_file)
    setup = " ".join(cfg["setup_commands"])
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d for d in deps if d.startswith("torch"))
    low = re.fullmatch(r"torch>=(\d+\.\d+),<.*", pinned)[1]
    versions = set(re.findall(r"torch==(\d+\.\d+)\.\d+", setup))
    assert versions == {low}, (versions, pinned)
    assert "nvidia-smi" in setup and "download.pytorch.org/whl/cpu" in setup
    assert setup.index("torch==") < setup.index("pip install -q \"$build\"")


def test_head_records_node_types_for_the_resource_check(cluster_file):
    cfg = _load(cluster_file)
    start = cfg["head_start_ray_commands"]
    i_start = next(i for i, c in enumerate(start) if "ray start --head" in c)
    report = [i for i, c in enumerate(start) if "python -m raydllm.sweep.cluster ~/ray_bootstrap_config.yaml" in c]
    assert report and report[0] > i_start


def _role_of_worker_profile(cfg: dict) -> tuple[str, str]:
    arns = {w["node_config"]["IamInstanceProfile"]["Arn"] for w in _worker_types(cfg).values()}
    assert len(arns) == 1, arns
    m = re.fullmatch(r"arn:aws:iam::(?P<account>[^:]+):instance-profile/(?P<name>[\w+=,.@-]+)", arns.pop())
    assert m, "worker IamInstanceProfile Arn"
    return m["account"], m["name"]


def test_worker_iam_setup_is_complete(cluster_file):
    """GPU workers get an instance profile of their own, never the head's (EC2 + S3 full access): its role may
    touch only the sweep's S3 prefix, and the head may pass that role, and no other, only to EC2. The policies
    ship in iam/; the AWS page's "Fill in" step shows the PassRole policy exactly and how to check it."""
    cfg = _load(cluster_file)
    if cfg["provider"]["type"] != "aws":
        pytest.skip("AWS only")
    account, role = _role_of_worker_profile(cfg)
    head = cfg["available_node_types"][cfg["head_node_type"]]["node_config"]
    assert role != "ray-autoscaler-v1" and role == "raydllm-worker"  # `ray up` gives the head ray-autoscaler-v1
    assert head.get("IamInstanceProfile", {}).get("Arn", "").rpartition("/")[2] != role
    policy = json.loads((REPO / "iam" / "pass-worker-role.json").read_text())
    statements = policy["Statement"]
    passes = [s for s in statements if "iam:PassRole" in json.dumps(s["Action"])]
    assert passes and all(s["Effect"] == "Allow" for s in passes)
    for s in passes:
        assert s["Resource"] == f"arn:aws:iam::{account}:role/{role}", s  # the worker role only: no wildcard
        assert s["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}, s
    trust = json.loads((REPO / "iam" / "worker-trust-policy.json").read_text())["Statement"]
    assert trust == [{"Sid": trust[0]["Sid"], "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
                      "Action": "sts:AssumeRole"}]
    s3 = json.loads((REPO / "iam" / "worker-s3-policy.json").read_text())["Statement"]
    storage = re.search(r"RAYDLLM_STORAGE=s3://(?P<bucket>[^/\s]+)/(?P<prefix>[^\s']+)", cluster_file.read_text())
    bucket, prefix = storage["bucket"], storage["prefix"].rstrip("/")
    for statement in s3:
        assert statement["Effect"] == "Allow" and "*" not in json.dumps(statement["Action"])
        resources = [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]
        # Objects under the sweep's prefix; the bucket itself only to list that prefix and find its region.
        assert all(r in (f"arn:aws:s3:::{bucket}/{prefix}/*", f"arn:aws:s3:::{bucket}") for r in resources), statement
        if f"arn:aws:s3:::{bucket}" in resources and statement["Action"] == "s3:ListBucket":
            assert statement["Condition"]["StringLike"]["s3:prefix"] == [prefix, f"{prefix}/*"]
    assert any(f"arn:aws:s3:::{bucket}/{prefix}/*" in json.dumps(s) and "s3:PutObject" in s["Action"] for s in s3)
    page = (REPO / "docs" / "how-to" / "aws.md").read_text()
    fill_in = page[page.index("## 1. Fill in and start"):page.index("## 2. ")]
    block = re.search(r"```json\n(.*?)```", fill_in, re.S)
    assert block and json.loads(block[1]) == policy, "the AWS page's Fill in step must show the policy file exactly"
    for text in (fill_in, cluster_file.read_text()):
        assert "aws iam put-role-policy --role-name ray-autoscaler-v1" in text
        assert "file://iam/pass-worker-role.json" in text and "file://iam/worker-s3-policy.json" in text
        assert "file://iam/worker-trust-policy.json" in text
        assert f"--instance-profile-name {role} --role-name {role}" in text
        assert "aws iam simulate-principal-policy --action-names iam:PassRole" in text
        assert "ContextKeyName=iam:PassedToService,ContextKeyValues=ec2.amazonaws.com" in text


def test_ssh_only_from_a_filled_in_address(cluster_file):
    """Ray 2.60 creates a security group admitting SSH from 0.0.0.0/0 for every node type whose node_config has no
    SecurityGroupIds (aws/config.py _configure_security_group, _create_default_ssh_inbound_rules), and
    provider.security_group only adds rules to it. So every node type names the user's group, whose SSH rule's
    CIDR is a fill-in, and nothing in the file opens SSH to the world."""
    cfg = _load(cluster_file)
    if cfg["provider"]["type"] != "aws":
        pytest.skip("AWS only")
    groups = {name: t["node_config"].get("SecurityGroupIds") for name, t in cfg["available_node_types"].items()}
    assert all(groups.values()), f"node types Ray would give its SSH-from-anywhere group: {groups}"
    assert len({tuple(g) for g in groups.values()}) == 1 and groups[cfg["head_node_type"]] == ["sg-YOUR_SECURITY_GROUP_ID"]
    assert "IpPermissions" not in json.dumps(cfg["provider"].get("security_group", {}))
    text = cluster_file.read_text()
    assert "0.0.0.0/0" not in text.replace("admits SSH from 0.0.0.0/0", "")  # only the comment that says why
    assert "--protocol tcp --port 22 --cidr YOUR_IP/32" in text
    assert "RAY_AUTH_MODE=disabled" not in text.replace("never set RAY_AUTH_MODE=disabled", "")


def test_mlflow_server_on_head(cluster_file):
    cfg = _load(cluster_file)
    cmds = " ".join(cfg["head_setup_commands"] + cfg["head_start_ray_commands"])
    m = re.search(r"mlflow server (?P<args>[^>&]*)", cmds)
    assert m, "no mlflow server started on the head"
    args = m["args"]
    assert '--backend-store-uri "$RAYDLLM_MLFLOW_DB"' in args
    default_db = re.search(r"export RAYDLLM_MLFLOW_DB=(\S+)'", cmds)
    assert default_db and default_db[1].startswith("sqlite:////home/ray/mlflow/"), "default store: a host folder"
    assert re.search(r"--artifacts-destination (s3|gs)://", args)
    assert "--port 5000" in args
    # Never on a public interface by config: the head's security group admits SSH only (see cluster.yaml).
    assert "--allowed-hosts" not in args and "--cors-allowed-origins" not in args
    # The autoscaler must be started by the head's ray start.
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in cmds


def test_shared_storage_is_object_store(cluster_file):
    text = cluster_file.read_text()
    assert re.search(r"RAYDLLM_STORAGE=(s3|gs)://", text)


def test_fake_cluster_config_is_valid():
    """The config tests/fake_cluster.py hands to the autoscaler passes the same schema + checks as-is
    (it must be complete: the wheel lacks fake_multi_node/example.yaml, so prepare_config cannot fill it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from fake_cluster import fake_cluster_config

    cfg = fake_cluster_config(idle_timeout_minutes=0.1, gcs_address="127.0.0.1:6379")
    jsonschema.validate(cfg, _schema())
    validate_config(cfg)
    assert cfg["available_node_types"]["ray.worker.slot"]["min_workers"] == 0


def test_checks_did_not_touch_the_aws_provider():
    # Nothing above may need boto3 or credentials: the AWS node provider module (imports boto3) stays unimported.
    assert "ray.autoscaler._private.aws.node_provider" not in sys.modules


# --- the Docker side, on Ray's own `docker run` construction ------------------------------------------------------

def _ray_docker_run(cfg: dict, *, as_head: bool) -> str:
    """The `docker run` command Ray's DockerCommandRunner.run_init builds for this node (docker_start_cmds with
    the bind mounts it keeps: file_mounts without Ray's bootstrap files), the image's HOME being /home/ray."""
    from ray.autoscaler._private.docker import docker_start_cmds

    docker = cfg["docker"]
    mounts = {k: v for k, v in cfg["file_mounts"].items()
              if k not in ("~/ray_bootstrap_config.yaml", "~/ray_bootstrap_key.pem")}
    options = docker.get("run_options", []) + docker.get(f"{'head' if as_head else 'worker'}_run_options", [])
    image = docker.get(f"{'head' if as_head else 'worker'}_image", docker["image"])
    return docker_start_cmds(cfg["auth"]["ssh_user"], image, mounts, docker["container_name"], options,
                             cfg["cluster_name"], "/home/ray", "docker")


def _run_on_fake_host(command: str, tmp_path: Path, host_gpus: int) -> list[str]:
    """Run `command` in bash (as Ray runs it on the host over SSH) with a `docker` that prints its arguments and
    an `nvidia-smi` that lists `host_gpus` GPUs; returns docker's arguments as the host's shell expanded them."""
    import subprocess

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    listing = "".join(f"GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i})\\n" for i in range(host_gpus))
    (bin_dir / "nvidia-smi").write_text(f'#!/bin/sh\nprintf "{listing}"\n' if host_gpus else
                                        '#!/bin/sh\necho "NVIDIA-SMI has failed: no devices"; exit 9\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    home = tmp_path / "home-ubuntu"
    home.mkdir(exist_ok=True)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(home)}
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, check=True)
    return done.stdout.splitlines()


def _volumes(args: list[str]) -> dict[str, str]:
    """container path -> host path, from docker run arguments."""
    return {dst: src for flag, spec in zip(args, args[1:]) if flag == "-v" for src, dst in [spec.split(":", 1)]}


def _env(args: list[str]) -> dict[str, str]:
    return dict(spec.split("=", 1) for flag, spec in zip(args, args[1:]) if flag == "-e")


def test_docker_mounts_ray_creates_and_who_writes_there(cluster_file, tmp_path):
    """Which folders Ray's `docker run` bind-mounts, and that the recipe writes only where it may: the checkout
    arrives as one folder at the path setup copies from; the build happens in a temporary folder no mount covers;
    the MLflow store is inside a host folder initialization_commands made (so it outlives the --rm container,
    and is the SSH user's, not root's as Docker would make it); the node-local staging folder and the host's
    GPU count reach the container under the names raydllm and node_setup.py read."""
    from ray.autoscaler.sdk import get_docker_host_mount_location

    from raydllm.engine.checkpoints import LOCAL_DIR_ENV
    from raydllm.sweep import node_setup

    cfg = _load(cluster_file)
    host_mounts = get_docker_host_mount_location(cfg["cluster_name"])
    mount = _checkout_mount(cfg)
    init = " ".join(cfg["initialization_commands"])
    for as_head in (True, False):
        command = _ray_docker_run(cfg, as_head=as_head)
        assert " --rm " in command  # nothing written inside the container survives it
        args = _run_on_fake_host(command, tmp_path, host_gpus=0 if as_head else 8)
        volumes, env = _volumes(args), _env(args)
        checkout = mount.replace("~/", "/home/ray/")
        assert volumes[checkout] == f"{host_mounts}/{mount}"
        assert not [dst for dst in volumes if "/tmp".startswith(dst.rstrip("/") + "/") or dst == "/tmp"], volumes
        assert env[node_setup.HOST_GPUS_ENV] == ("0" if as_head else "8")
        local = env[LOCAL_DIR_ENV]
        assert local in volumes and volumes[local] == str(Path("/mnt/raydllm-local").resolve())
        if as_head:
            db = re.search(r"export RAYDLLM_MLFLOW_DB=sqlite:///(\S+)'", " ".join(cfg["head_setup_commands"]))[1]
            holder = [dst for dst in volumes if db.startswith(dst.rstrip("/") + "/")]
            assert holder, f"the MLflow database {db} is inside the container only: {volumes}"
            host_folder = volumes[holder[0]]
            assert host_folder == str(tmp_path / "home-ubuntu" / "raydllm-mlflow")
            assert "mkdir -p ~/raydllm-mlflow" in init
    # The host side runs node_setup.py from the host copy of the checkout mount, before the container starts.
    script = re.search(r"sudo python3 '([^']+)' local --link (\S+)", init)
    assert script and script[1] == f"{host_mounts}/{mount}/raydllm/sweep/node_setup.py"
    assert script[2] == "/mnt/raydllm-local"
    assert (REPO / "raydllm" / "sweep" / "node_setup.py").is_file()
    # The GPU check runs first in the container, before torch picks its build by what nvidia-smi sees.
    assert cfg["setup_commands"][1] == f"python {mount}/raydllm/sweep/node_setup.py gpus"
    assert "torch==" in cfg["setup_commands"][2]


def test_token_authentication_stays_on(cluster_file):
    """Ray 2.60's `ray start --head` turns token auth on only where a token file already exists (a fresh node
    has none): the recipe sets RAY_AUTH_MODE=token on every node, with the token folder mounted."""
    cfg = _load(cluster_file)
    token = re.search(r"RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=\$HOME/(\S+)/auth_token", cfg["setup_commands"][0])
    assert token, cfg["setup_commands"][0]
    assert f"~/{token[1]}" in cfg["file_mounts"]
    assert "RAY_AUTH_MODE=token ray job submit" in cluster_file.read_text()
