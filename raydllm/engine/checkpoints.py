"""Engine layer: the on-disk layout of a raydllm checkpoint and how to read it back.

What `worker.WorkerLoop.save` writes (DeepSpeed 0.19 `save_checkpoint` with tag "engine"):

    <checkpoint>/raydllm.json                        {"step", "config", ...}
    <checkpoint>/engine/mp_rank_00_model_states.pt   {"module": OnlineModel state dict, ...}  (ZeRO 0-2)
    <checkpoint>/engine/zero_pp_rank_*_mp_rank_00_model_states.pt + optim shards            (ZeRO 3)
    <checkpoint>/ema.pt                              EMA target state dict (keys "model.*"; lambda > 0 only)
    <checkpoint>/export/                             final checkpoint only: the backbone as a save_pretrained
                                                     folder (+ tokenizer, remote code) in the training dtype
    <checkpoint>/export/ema/model.safetensors        with train.export_ema: the EMA weights, same dtype

The OnlineModel state dict holds the backbone under `backbone.model.` and the predictor under `predictor.`.
LoRA runs (`model.lora.rank > 0`) leave the frozen base out (`exclude_frozen_parameters`): `backbone.model.*` then
holds the PEFT adapter tensors only (`base_model.model.<module>.lora_A.default.weight`, ...), ema.pt the EMA of
those adapters (keys `model.<same names>`), and the base is rebuilt from the config's model source.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch

from raydllm.core.config import ConfigError

log = logging.getLogger(__name__)

DS_TAG = "engine"
MODEL_STATES = "mp_rank_00_model_states.pt"
BACKBONE_PREFIX = "backbone.model."
EXPORT_DIR = "export"
EXPORT_EMA = "ema/model.safetensors"
SOURCE_FILE = ".raydllm-source"  # in a local copy of a remote checkpoint: where it came from (checkpoint_identity)
# Where checkpoints are staged before Ray uploads them: the env var, else the instance-store NVMe that AWS
# Deep Learning AMIs mount (p4d/p4de: 8 x 1 TB), else the system temp folder.
LOCAL_DIR_ENV = "RAYDLLM_LOCAL_DIR"
NVME_CANDIDATES = ("/opt/dlami/nvme",)


def staging_dir() -> str | None:
    """The folder checkpoints are written to before upload (None = the system temp folder)."""
    for candidate in [os.environ.get(LOCAL_DIR_ENV)] + list(NVME_CANDIDATES):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            folder = Path(candidate, "raydllm-staging")
            folder.mkdir(exist_ok=True)
            return str(folder)
        if candidate and candidate == os.environ.get(LOCAL_DIR_ENV):
            log.warning("%s=%s is not a writable folder; staging checkpoints in the temp folder", LOCAL_DIR_ENV,
                        candidate)
    return None


def folder_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def export_folder(path: str | Path) -> Path | None:
    """The weights-only export of a checkpoint folder, when it has one."""
    folder = resolve_checkpoint_dir(path) / EXPORT_DIR
    return folder if (folder / "config.json").is_file() else None


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """The checkpoint folder: `path` itself when it holds raydllm.json, else its newest `checkpoint_*`
    child that does (a Ray Train run folder)."""
    path = Path(path).expanduser()
    if (path / "raydllm.json").is_file():
        return path
    if path.is_dir():
        children = [c for c in path.iterdir() if c.is_dir() and (c / "raydllm.json").is_file()]
        if children:
            return max(children, key=lambda c: (json.loads((c / "raydllm.json").read_text()).get("step", 0), c.name))
    raise ConfigError(f"checkpoint {path}: no raydllm.json here (not a raydllm checkpoint folder)")


def torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - DeepSpeed stores a few plain Python objects beside the tensors
        log.info("%s: not loadable with weights_only=True; loading it as a trusted local checkpoint", path)
        return torch.load(path, map_location="cpu", weights_only=False)


def read_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The OnlineModel state dict (`backbone.model.*`, `predictor.*`) of a raydllm checkpoint folder."""
    folder = resolve_checkpoint_dir(path)
    states = folder / DS_TAG / MODEL_STATES
    module = torch_load(states).get("module") if states.is_file() else None
    if module is None:  # ZeRO-3 keeps the weights only in the partitioned optimizer shards
        if not any((folder / DS_TAG).glob("zero_pp_rank_*_model_states.pt")):
            raise ConfigError(f"checkpoint {folder}: no {DS_TAG}/{MODEL_STATES} (not a DeepSpeed checkpoint)")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        module = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
    return dict(module)


def read_checkpoint_meta(path: str | Path) -> dict:
    return json.loads((resolve_checkpoint_dir(path) / "raydllm.json").read_text())


def materialize(uri: str, *, ema: bool = False) -> Path:
    """A local copy of what evaluating a remote checkpoint (s3://, gs://, ..., as Ray Train stores them) reads,
    via pyarrow: raydllm.json and the weights-only export/ where the checkpoint has one that serves (a full
    fine-tuning run's; with `ema`, one that holds export/ema/), else the whole folder (a LoRA run's adapters, a
    checkpoint without export/). At 8B that is 16 GB of a 160 GB checkpoint: the engine's weights, optimizer
    shards and EMA stay where they are. `uri` may also be a Ray Train run folder: its newest checkpoint is taken."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(uri)
    root = _remote_checkpoint(fs, root.rstrip("/"), uri)
    local = Path(tempfile.mkdtemp(prefix="raydllm-ckpt-"))

    def fetch(relative: str) -> None:
        target = local / relative
        # pyarrow copies a folder into one that exists, creating what is below it
        (target if fs.get_file_info(f"{root}/{relative}").type == pafs.FileType.Directory
         else target.parent).mkdir(parents=True, exist_ok=True)
        pafs.copy_files(f"{root}/{relative}", str(target), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())

    fetch("raydllm.json")
    scheme = uri.split("://", 1)[0]
    (local / SOURCE_FILE).write_text(f"{scheme}://{root.lstrip('/') if scheme != 'file' else root}")
    lora = json.loads((local / "raydllm.json").read_text()).get("config", {}).get("model", {}).get("lora", {})
    wanted = [f"{EXPORT_DIR}/config.json"] + ([f"{EXPORT_DIR}/{EXPORT_EMA}"] if ema else [])
    if not lora.get("rank") and all(fs.get_file_info(f"{root}/{name}").type == pafs.FileType.File for name in wanted):
        fetch(EXPORT_DIR)
    else:
        pafs.copy_files(root, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local


def checkpoint_identity(folder: str | Path) -> str:
    """What a checkpoint is, for the test ledger: the remote checkpoint a local copy came from (materialize writes
    it beside the copy: each copy is a new temporary folder, and the ledger must know the same checkpoint again),
    else the folder itself."""
    source = Path(folder) / SOURCE_FILE
    return source.read_text().strip() if source.is_file() else str(folder)


def _remote_checkpoint(fs, root: str, uri: str) -> str:
    """`root` when it holds raydllm.json, else its newest `checkpoint_*` child that does (resolve_checkpoint_dir's
    rule, on the remote file system)."""
    import pyarrow.fs as pafs

    if fs.get_file_info(f"{root}/raydllm.json").type == pafs.FileType.File:
        return root
    children = [info.path for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                if info.type == pafs.FileType.Directory
                and fs.get_file_info(f"{info.path}/raydllm.json").type == pafs.FileType.File]
    if not children:
        raise ConfigError(f"checkpoint {uri}: no raydllm.json there (not a raydllm checkpoint folder)")

    def step(path: str) -> int:
        with fs.open_input_stream(f"{path}/raydllm.json") as stream:
            return int(json.loads(stream.read()).get("step", 0))

    return max(children, key=lambda path: (step(path), path))


def backbone_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = BACKBONE_PREFIX
    if any(k.startswith(prefix) for k in state):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state

