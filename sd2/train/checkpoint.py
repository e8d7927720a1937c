"""Resumable training state: model, optimizer, scheduler, data position and RNG, in one folder.

``<out_dir>/checkpoint/`` holds the latest state only. It is written to a temporary folder and then
renamed over the old one, so a kill -9 at any moment leaves either the previous checkpoint or the
new one, never a torn one. The data position is the optimizer step: the batch order is a pure
function of (seed, epoch), so step -> (epoch, batch) is exact. Each process saves its own RNG
state (``rng-<rank>``); the main process saves the rest.

No pickle: a run folder is something users copy between machines and share, and unpickling runs
whatever code the file names. Every state is split into its tensors, stored as safetensors
(``<name>.safetensors``), and the rest (numbers, strings, lists, the RNGs' integer states), stored
as JSON (``<name>.json``) with a placeholder where each tensor was. Loading reads those two formats
only; a ``*.pt`` file in a checkpoint (sd2 before this format, or planted) is never opened.

Under FSDP (sd2/train/fsdp.py) the same files hold the same whole states: the model's and the
optimizer's shards are gathered to the main process, which writes them (the optimizer state keyed
by parameter name instead of by index), and on resume the main process reads them and broadcasts,
each process keeping its shards. ``state.json`` records which layout wrote it, and a checkpoint is
only resumed by the same layout.

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
from typing import Any

import torch

from sd2.core.errors import Sd2Error

NAME = "checkpoint"
_TENSOR, _TUPLE, _ITEMS, _ARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"


# -- state <-> (tensors, JSON) -----------------------------------------------------------------

def _encode(obj: Any, tensors: dict, path: str) -> Any:
    """JSON-able structure for ``obj``; its tensors go into ``tensors`` under their path."""
    import numpy as np

    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().contiguous()
        return {_TENSOR: path}
    if isinstance(obj, np.ndarray):
        return {_ARRAY: obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {_TUPLE: [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj) and not ({_TENSOR, _TUPLE, _ITEMS, _ARRAY} & obj.keys()):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {_ITEMS: [[_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                         for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot store a {type(obj).__name__} at {path} in a checkpoint (tensors and JSON only)")


def _decode(obj: Any, tensors: dict) -> Any:
    import numpy as np

    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if _TENSOR in obj:
        return tensors[obj[_TENSOR]]
    if _ARRAY in obj:
        return np.asarray(obj[_ARRAY], dtype=np.dtype(obj["dtype"]))
    if _TUPLE in obj:
        return tuple(_decode(v, tensors) for v in obj[_TUPLE])
    if _ITEMS in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj[_ITEMS]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def save_state(state: Any, folder: Path, name: str) -> None:
    """``state`` as ``folder/name.safetensors`` (its tensors) + ``folder/name.json`` (the rest)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, name)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(structure))


def load_state(folder: Path, name: str) -> Any:
    """The state written by ``save_state``; a missing or unreadable file is an Sd2Error naming it."""
    from safetensors.torch import load_file

    files = [folder / f"{name}.json", folder / f"{name}.safetensors"]
    try:
        structure = json.loads(files[0].read_text())
        tensors = load_file(str(files[1]))
        return _decode(structure, tensors)
    except Exception as e:  # OSError, JSON errors, a dangling placeholder, or safetensors' own error type
        raise Sd2Error(f"cannot read the checkpoint state {files[0].name} + {files[1].name} in {folder} "
                       f"({type(e).__name__}: {str(e)[:200]}); delete {folder} to start this stage over") from None


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


# -- the checkpoint folder -----------------------------------------------------------------------

def save(out_dir: Path, accelerator, model, optimizer, scheduler, step: int, extra: dict, config_json: dict) -> Path:
    """Write the checkpoint for ``step`` (all processes call this)."""
    from safetensors.torch import save_file, save_model

    from sd2.train import fsdp

    sharded = fsdp.active(accelerator)
    if sharded:   # collectives: every process takes part, the main one receives the whole states
        model_state, optimizer_state = fsdp.full_model_state(model), fsdp.full_optimizer_state(model, optimizer)
    final = Path(out_dir) / NAME
    tmp = Path(out_dir) / f".{NAME}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    save_state(_rng_state(), tmp, f"rng-{accelerator.process_index}")
    if accelerator.is_main_process:
        if sharded:   # a gathered state holds tied weights under each name, as separate tensors
            save_file(_unshared(model_state), str(tmp / "model.safetensors"))
            save_state(optimizer_state, tmp, "optimizer")
        else:
            save_model(accelerator.unwrap_model(model), str(tmp / "model.safetensors"))  # tied weights stored once
            save_state(optimizer.state_dict(), tmp, "optimizer")
        save_state(scheduler.state_dict(), tmp, "scheduler")
        (tmp / "state.json").write_text(json.dumps({"step": step, "config": config_json, "fsdp": sharded, **extra},
                                                   indent=2))
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


def _unshared(state: dict) -> dict:
    """``state`` with no two entries sharing memory (safetensors refuses that): a repeat is copied."""
    seen, out = set(), {}
    for k, v in state.items():
        v = v.detach().contiguous()
        out[k] = v.clone() if v.data_ptr() in seen else v
        seen.add(v.data_ptr())
    return out


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
    from safetensors.torch import load_model

    state = json.loads((folder / "state.json").read_text())
    if state.get("config") != config_json:
        raise Sd2Error(f"{folder} was written by a finetune run with a different config; "
                       f"delete {folder} to start over, or restore that config to resume")
    if not (folder / "model.safetensors").is_file():
        old = sorted(p.name for p in folder.glob("*.pt"))
        raise Sd2Error(f"{folder} holds no model.safetensors" + (
            f" but pickle files ({', '.join(old)}), which sd2 never loads (they can run code)" if old else "")
            + f"; delete {folder} to start this stage over")
    rng = f"rng-{accelerator.process_index}"
    if not (folder / f"{rng}.json").is_file():
        raise Sd2Error(f"{folder} has no {rng}.json: it was written with a different number of processes "
                       f"({accelerator.num_processes} now); resume with the same launch, or delete {folder}")
    from sd2.train import fsdp

    if bool(state.get("fsdp", False)) != fsdp.active(accelerator):
        was, now = (("FSDP", "without FSDP") if state.get("fsdp") else ("without FSDP", "FSDP"))
        raise Sd2Error(f"{folder} was written by a run {was}, and this run uses {now}; resume with the same "
                       f"accelerate config, or delete {folder}")
    if fsdp.active(accelerator):
        _load_sharded(folder, accelerator, model, optimizer)
        scheduler.load_state_dict(load_state(folder, "scheduler"))
        _set_rng_state(load_state(folder, rng))
        return state
    try:
        load_model(accelerator.unwrap_model(model), str(folder / "model.safetensors"))
    except Exception as e:  # a torn or foreign file: safetensors' own error type, or a shape/key mismatch
        raise Sd2Error(f"cannot restore {folder / 'model.safetensors'} into the model: {str(e)[:300]}; "
                       f"delete {folder} to start this stage over") from None
    optimizer.load_state_dict(load_state(folder, "optimizer"))
    scheduler.load_state_dict(load_state(folder, "scheduler"))
    _set_rng_state(load_state(folder, rng))
    return state


def _load_sharded(folder: Path, accelerator, model, optimizer) -> None:
    """FSDP: the main process reads the whole states and broadcasts them; each process keeps its
    shards. A file the main process cannot read fails every process (none waits for a broadcast)."""
    from safetensors.torch import load_file

    from sd2.train import fsdp
    from sd2.train.distributed import global_sum

    model_state, optimizer_state, error = {}, {}, None
    if accelerator.is_main_process:
        try:
            model_state = load_file(str(folder / "model.safetensors"))
            optimizer_state = load_state(folder, "optimizer")
        except Exception as e:  # safetensors' own error type, or load_state's Sd2Error
            error = f"cannot read the checkpoint in {folder} ({str(e)[:300]}); delete {folder} to start this stage over"
    if global_sum(accelerator, float(error is not None))[0]:
        raise Sd2Error(error or f"the main process could not read the checkpoint in {folder}; see its error")
    fsdp.load_full_state(model, optimizer, model_state, optimizer_state)


def remove(out_dir: Path) -> None:
    for name in (NAME, f".{NAME}.old", f".{NAME}.tmp"):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)
