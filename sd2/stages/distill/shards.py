"""Shards: the distilled rows flushed every N prompts, so a killed run resumes where it stopped.

Shard i holds the rows of prompts [i*N, (i+1)*N) of the (deterministic) prompt list. It is written
as a ``save_to_disk`` folder under a temporary name and renamed into place, so a shard folder that
exists is complete; a kill -9 mid-write leaves only a temporary folder, removed on the next run.
``shards/key.json`` records what the shards were made from (config, models, seed): when it
differs, the old shards are discarded rather than mixed into a different dataset.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from sd2.core.artifacts import write_json_atomic

SHARDS = "shards"
STATS = "stats.json"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}"


def prepare(out_dir: Path, key: dict) -> Path:
    """The shard folder, emptied unless it was made with the same key; stray temporaries removed."""
    folder = out_dir / SHARDS
    key_file = folder / "key.json"
    if folder.is_dir() and (not key_file.is_file() or json.loads(key_file.read_text()) != key):
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for p in folder.iterdir():
        if p.name.startswith("."):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    if not key_file.is_file():
        write_json_atomic(key_file, key)
    return folder


def done(folder: Path, n_shards: int) -> list[int]:
    return [i for i in range(n_shards) if (folder / shard_name(i) / STATS).is_file()]


def _quiet_datasets():
    """datasets draws a progress bar per save; switch them off (restored by the caller's finally)."""
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    return was_on


def _restore(was_on: bool) -> None:
    from datasets.utils import logging as ds_logging

    if was_on:
        ds_logging.enable_progress_bar()


def write(folder: Path, i: int, rows: list[dict], features, stats: dict) -> Path:
    """Write shard i atomically: its data and stats into a temporary folder, then one rename."""
    from datasets import Dataset

    tmp = Path(tempfile.mkdtemp(prefix=f".{shard_name(i)}.", dir=folder))
    was_on = _quiet_datasets()
    try:
        Dataset.from_list(rows, features=features).save_to_disk(str(tmp / "data"))
        (tmp / STATS).write_text(json.dumps(stats))
        final = folder / shard_name(i)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _restore(was_on)
    return final


def stats(folder: Path, i: int) -> dict:
    return json.loads((folder / shard_name(i) / STATS).read_text())


def combine(folder: Path, n_shards: int, dest: Path) -> None:
    """All shards, in order, as one dataset saved at ``dest`` (atomically)."""
    from datasets import concatenate_datasets, load_from_disk

    parts = [load_from_disk(str(folder / shard_name(i) / "data")) for i in range(n_shards)]
    ds = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    was_on = _quiet_datasets()
    try:
        ds.save_to_disk(str(tmp))
    finally:
        _restore(was_on)
    if dest.exists():
        shutil.rmtree(dest)
    os.rename(tmp, dest)
