"""Resumable training state: model, optimizer, scheduler, data position and RNG, in one folder.

``<out_dir>/checkpoint/`` holds the latest state only. It is written to a temporary folder and then
renamed over the old one, so a kill -9 at any moment leaves either the previous checkpoint or the
new one, never a torn one. The data position is the optimizer step: the batch order is a pure
function of (seed, epoch), so step -> (epoch, batch) is exact. Each process saves its own RNG
state (``rng-<rank>.pt``); the main process saves the rest.

The checkpoint records the config it was made with; the runner only keeps a stage folder across
reruns when the stage's fingerprint is unchanged, so a mismatch means the folder was edited or
reused by hand, and is refused rather than guessed around.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from sd2.core.errors import Sd2Error

NAME = "checkpoint"


def _rng_state() -> dict:
    import numpy as np

    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(out_dir: Path, accelerator, model, optimizer, scheduler, step: int, extra: dict, config_json: dict) -> Path:
    """Write the checkpoint for ``step`` (all processes call this)."""
    final = Path(out_dir) / NAME
    tmp = Path(out_dir) / f".{NAME}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        torch.save(accelerator.unwrap_model(model).state_dict(), tmp / "model.pt")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": config_json, **extra}, indent=2))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = Path(out_dir) / f".{NAME}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find(out_dir: Path) -> Path | None:
    """The checkpoint to resume from, if any. A crash between the two renames in ``save`` leaves
    only ``.checkpoint.old``, which is then complete and used."""
    for name in (NAME, f".{NAME}.old"):
        p = Path(out_dir) / name
        if (p / "state.json").is_file():
            return p
    return None


def load(folder: Path, accelerator, model, optimizer, scheduler, config_json: dict) -> dict:
    """Restore everything into the live objects; returns state.json (step and extras)."""
    state = json.loads((folder / "state.json").read_text())
    if state.get("config") != config_json:
        raise Sd2Error(f"{folder} was written by a finetune run with a different config; "
                       f"delete {folder} to start over, or restore that config to resume")
    rng = folder / f"rng-{accelerator.process_index}.pt"
    if not rng.is_file():
        raise Sd2Error(f"{folder} has no {rng.name}: it was written with a different number of processes "
                       f"({accelerator.num_processes} now); resume with the same launch, or delete {folder}")
    map_location = "cpu"
    accelerator.unwrap_model(model).load_state_dict(torch.load(folder / "model.pt", map_location=map_location))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=map_location))
    scheduler.load_state_dict(torch.load(folder / "scheduler.pt", map_location=map_location))
    _set_rng_state(torch.load(rng, map_location="cpu", weights_only=False))
    return state


def remove(out_dir: Path) -> None:
    for name in (NAME, f".{NAME}.old", f".{NAME}.tmp"):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)
