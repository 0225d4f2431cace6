"""Sweep layer: the test ledger: every (config, seed, checkpoint) ever scored on test, on the sweep's parent run.

The test split is read once per thing scored, whatever came in between: winners A, then B, then A again is
refused at the third, because A's entries are still in the ledger (comparing with the previous report alone
would let it through). `raydllm report` and `raydllm eval --split test` on a sweep's trial both go through
`claim`, which records the entries BEFORE the first test example is read: an interrupted evaluation has looked
at test all the same. The ledger is the JSON artifact `ledger/test.json` of the parent run.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from raydllm.core.config import ConfigError
from raydllm.engine.checkpoints import checkpoint_identity

LEDGER_PATH = "ledger/test.json"


def entry(config_key: str, seed: int | str, checkpoint: str, *, run_id: str | None = None) -> dict:
    """One ledger line; a local copy of a remote checkpoint is recorded as the remote checkpoint, so a second look
    from a fresh copy is known as the same look."""
    return {"config_key": str(config_key), "seed": str(seed), "checkpoint": checkpoint_identity(checkpoint),
            "run_id": run_id}


def _key(item: dict) -> tuple[str, str, str]:
    return item["config_key"], item["seed"], item["checkpoint"]


def read_ledger(client: MlflowClient, parent_run_id: str) -> list[dict]:
    """The ledger's entries ([] before the first test evaluation)."""
    if not any(f.path == LEDGER_PATH for f in client.list_artifacts(parent_run_id, "ledger")):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(parent_run_id, LEDGER_PATH, tmp)
        return json.loads(Path(path).read_text())["scored"]


def claim(client: MlflowClient, parent_run_id: str, entries: list[dict], *, force: bool, by: str) -> list[dict]:
    """Record `entries` as scored on test, or refuse (one ConfigError) if any was scored before and not `force`.
    Returns the entries that had been scored before (empty unless forced)."""
    scored = read_ledger(client, parent_run_id)
    seen = {_key(item): item for item in scored}
    again = [seen[_key(e)] for e in entries if _key(e) in seen]
    if again and not force:
        first = again[0]
        raise ConfigError(f"test split already scored for config {first['config_key']} seed {first['seed']} "
                          f"({first.get('at')}, by {first.get('by')}; ledger {LEDGER_PATH} on run "
                          f"{parent_run_id[:8]}): the test split is read once. Pass --force to score it again")
    at = time.strftime("%Y-%m-%d %H:%M:%S")
    scored += [e | {"at": at, "by": by, "forced": _key(e) in seen} for e in entries]
    client.log_text(parent_run_id, json.dumps({"scored": scored}, indent=1) + "\n", LEDGER_PATH)
    return again


def require_finished(client: MlflowClient, parent_run_id: str, sweep: str) -> None:
    """`report` reads test only for a sweep that ended: its winners are final."""
    status = client.get_run(parent_run_id).info.status
    if status != "FINISHED":
        raise ConfigError(f"sweep {sweep}: its parent run is {status}, not FINISHED: report scores a finished "
                          f"sweep's winners on test (resume it with `raydllm tune --resume`, then report)")


def trial_parent(client: MlflowClient, run_id: str) -> tuple[str | None, str]:
    """(parent run id or None, config key) of a sweep trial's run."""
    tags = client.get_run(run_id).data.tags
    return tags.get("mlflow.parentRunId"), tags.get("raydllm.config_key", run_id)


def claim_trial(tracking_uri: str, run_id: str, checkpoint, *, force: bool) -> None:
    """`raydllm eval --split test` on a run: through its sweep's ledger when it is a sweep's trial."""
    client = MlflowClient(tracking_uri)
    parent, key = trial_parent(client, run_id)
    if parent is not None:
        seed = client.get_run(run_id).data.params.get("train.seed", "?")
        claim(client, parent, [entry(key, seed, checkpoint, run_id=run_id)], force=force, by="eval")
