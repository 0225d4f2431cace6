"""`raydllm eval` / `report` on a cluster copy a remote checkpoint only as far as evaluating it reads: raydllm.json
and export/ (16 GB at 8B), never the engine's weights, optimizer shards or EMA (144 GB). The "remote" here is a
local folder reached through pyarrow's file:// file system, the same code path as s3://."""
import json
from pathlib import Path

from raydllm.engine.checkpoints import EXPORT_DIR, SOURCE_FILE, export_folder, materialize, resolve_checkpoint_dir
from raydllm.sweep.ledger import entry
from raydllm.sweep.tracking import resolve_target

BIG = 4 * 1024 * 1024  # stands for the optimizer shards: must never be copied when export/ serves


def _checkpoint(folder: Path, *, step: int = 10, lora_rank: int = 0, export_ema: bool = False) -> Path:
    (folder / "engine").mkdir(parents=True)
    (folder / "raydllm.json").write_text(json.dumps({"step": step, "config": {"model": {"lora": {"rank": lora_rank}}}}))
    (folder / "engine" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\0" * BIG)
    (folder / "engine" / "mp_rank_00_model_states.pt").write_bytes(b"\0" * 1024)
    (folder / "ema.pt").write_bytes(b"\0" * 1024)
    (folder / EXPORT_DIR).mkdir()
    (folder / EXPORT_DIR / "config.json").write_text("{}")
    (folder / EXPORT_DIR / "model.safetensors").write_bytes(b"\1" * 2048)
    if export_ema:
        (folder / EXPORT_DIR / "ema").mkdir()
        (folder / EXPORT_DIR / "ema" / "model.safetensors").write_bytes(b"\2" * 2048)
    return folder


def _files(folder: Path) -> set[str]:
    """The checkpoint's files in a local copy (not the note of where it came from)."""
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != SOURCE_FILE}


def test_only_the_export_comes_down(tmp_path):
    remote = _checkpoint(tmp_path / "remote" / "checkpoint_000000")
    local = materialize(f"file://{remote}")
    assert _files(local) == {"raydllm.json", "export/config.json", "export/model.safetensors"}
    assert (local / EXPORT_DIR / "model.safetensors").read_bytes() == b"\1" * 2048
    assert resolve_checkpoint_dir(local) == local and export_folder(local) == local / EXPORT_DIR
    # The same through what `raydllm eval s3://...` and `report` call.
    folder, run_id = resolve_target(f"file://{remote}", "sqlite:///unused.db")
    assert run_id is None and "engine/zero_pp_rank_0_mp_rank_00_optim_states.pt" not in _files(folder)


def test_ema_weights_from_the_export_or_the_whole_checkpoint(tmp_path):
    with_ema = _checkpoint(tmp_path / "a", export_ema=True)
    assert _files(materialize(f"file://{with_ema}", ema=True)) == {
        "raydllm.json", "export/config.json", "export/model.safetensors", "export/ema/model.safetensors"}
    # No EMA in the export: eval --ema reads ema.pt, so the checkpoint comes down whole.
    without = _checkpoint(tmp_path / "b")
    assert "ema.pt" in _files(materialize(f"file://{without}", ema=True))


def test_lora_checkpoints_come_down_whole(tmp_path):
    """A LoRA run's evaluation reads its adapters from the engine files (the base is rebuilt from the hub)."""
    remote = _checkpoint(tmp_path / "lora", lora_rank=16)
    assert "engine/mp_rank_00_model_states.pt" in _files(materialize(f"file://{remote}"))


def test_run_folder_gives_its_newest_checkpoint(tmp_path):
    run = tmp_path / "train-trial"
    _checkpoint(run / "checkpoint_000000", step=70)
    _checkpoint(run / "checkpoint_000001", step=420)
    local = materialize(f"file://{run}")
    assert json.loads((local / "raydllm.json").read_text())["step"] == 420
    assert _files(local) == {"raydllm.json", "export/config.json", "export/model.safetensors"}


def test_the_ledger_knows_a_remote_checkpoint_again_from_a_fresh_copy(tmp_path):
    """Each `report` copies a remote checkpoint into a new temporary folder; the test ledger records the remote
    checkpoint, so a second report of the same winners is the same look (and refused), not a new one."""
    run = tmp_path / "train-trial"
    _checkpoint(run / "checkpoint_000001", step=420)
    first, second = materialize(f"file://{run}"), materialize(f"file://{run}")
    assert first != second
    assert entry("k", 123, first) == entry("k", 123, second)
    assert entry("k", 123, first)["checkpoint"] == f"file://{run / 'checkpoint_000001'}"
    assert entry("k", 123, run / "checkpoint_000001")["checkpoint"] == str(run / "checkpoint_000001")  # local: as is
