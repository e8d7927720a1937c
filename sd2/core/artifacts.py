"""The artifact store: folder names, manifests (the completion marker), the run lock.

    <out>/<run>/
      recipe.yaml            the resolved recipe, as last run
      run.log, metrics.jsonl
      NN_<id>/               one folder per stage; <id> is "distill", "evaluate" or "<branch>.<stage>"
        manifest.json        written last and atomically: the stage is done only when it exists
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from sd2 import __version__
from sd2.core.errors import Sd2Error
from sd2.core.paths import expand

MANIFEST = "manifest.json"
PARTIAL = ".sd2-partial"  # holds the fingerprint of an unfinished stage, so its checkpoints can be resumed
LOCK = ".lock"


def stage_folder(index: int, stage_id: str) -> str:
    """The one function that names stage folders."""
    return f"{index:02d}_{stage_id}"


def parse_folder(name: str) -> tuple[int, str] | None:
    head, sep, tail = name.partition("_")
    if sep and head.isdigit() and len(head) == 2 and tail:
        return int(head), tail
    return None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary name in the same folder, fsync, then rename over the target."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a torn temporary behind
        raise


# errno values that mean "this location cannot take our output" (disk full, quota, read-only, denied)
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def write_failure(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write (disk full, read-only, permission), or None. Libraries wrap
    it (datasets) or replace it: safetensors raises its own SafetensorError("... No space left on
    device (os error 28)"), so the cause/context chain is searched, messages included."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
            return exc
        m = _OS_ERROR.search(str(exc))
        if m and int(m.group(1)) in WRITE_ERRNOS:
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
        exc = exc.__cause__ or exc.__context__
    return None


_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust extensions (safetensors, tokenizers) report an errno


def writable_dir(path: Path, what: str) -> Path:
    """Create the output folder ``path`` if needed and prove that a file can be written in it, before
    any model loads. ``what`` names it in the error (e.g. "--out"). Returns the path."""
    path = expand(path)
    for parent in [path, *path.parents]:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise Sd2Error(f"{what} {path}: {parent} is a file, not a folder; choose another location")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".sd2-write-test-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise Sd2Error(f"{what} {path}: cannot write there ({e.strerror or e}); choose a folder you can write to") from None
    return path


def read_manifest(folder: Path) -> dict | None:
    """The stage folder's manifest, or None: the stage is not done (no manifest, or a torn or foreign one)."""
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def fingerprint(stage: str, config: dict, inputs: dict, seed: int) -> str:
    blob = json.dumps({"stage": stage, "config": config, "inputs": inputs, "seed": seed, "sd2": __version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_PACKAGES = ("torch", "transformers", "llmcompressor", "accelerate", "datasets", "safetensors", "pydantic")


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "sd2": __version__}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def git_sha() -> str | None:
    """The sd2 checkout's commit, when sd2 runs from a git checkout."""
    try:
        res = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return res.stdout.strip() or None if res.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    import torch

    from sd2.core.precision import cpu_info

    info = {"host": socket.gethostname(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), **cpu_info()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class RunLock:
    """Refuses a second concurrent run on one run folder; recognises a lock left by a killed run."""

    def __init__(self, run_dir: Path, log=None):
        self.path = run_dir / LOCK
        self.log = log

    def __enter__(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv})
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._check_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(body)
            return self
        raise Sd2Error(f"could not take the lock {self.path}")

    def _check_stale(self) -> None:
        try:
            held = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            held = {}
        pid, host = held.get("pid"), held.get("host")
        if host == socket.gethostname() and isinstance(pid, int) and _alive(pid):
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.get("started", 0)))
            raise Sd2Error(f"run folder {self.path.parent} is in use by another sd2 run (pid {pid}, started {started}). "
                           f"Wait for it to finish, or stop it; if that process is not sd2, delete {self.path}.")
        if host not in (None, socket.gethostname()):
            raise Sd2Error(f"run folder {self.path.parent} is locked by a run on host '{host}' (pid {pid}). "
                           f"If that run is gone, delete {self.path}.")
        if self.log:
            self.log.warning("removing a stale lock left by pid %s (that process is gone)", pid)
        self.path.unlink(missing_ok=True)

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped) still answers kill(0); it holds nothing.
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return True
