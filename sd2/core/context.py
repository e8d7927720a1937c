"""What a stage gets besides its config: typed inputs and a context (seed, device, logger, progress, metrics)."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sd2.core.errors import Sd2Error
from sd2.core.models import ModelSource


@dataclass
class StageInputs:
    """Flat, typed inputs. Each is None unless the stage consumes it and the plan provides it."""

    target: ModelSource | None = None
    model: ModelSource | None = None          # the branch's current drafter (a folder, or a hub id)
    dataset: Path | None = None               # the branch's current distilled dataset (save_to_disk folder)
    drafters: dict[str, ModelSource] = field(default_factory=dict)  # evaluate: "raw" and each branch's final drafter
    cross_tokenizer: bool = False             # the drafter's tokenizer differs from the target's


@dataclass
class StageContext:
    seed: int
    device: str
    log: logging.Logger
    stage_id: str
    metrics_path: Path | None = None
    run_dir: Path | None = None

    def log_metrics(self, **values) -> None:
        """Append one JSON line to the run's metrics.jsonl, tagged with the stage id and time."""
        if self.metrics_path is None:
            return
        row = {"stage": self.stage_id, "time": round(time.time(), 3), **values}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, default=float) + "\n")

    def progress(self, iterable=None, total: int | None = None, desc: str = "", unit: str = "it", **kw):
        """A progress bar on stderr. Off a terminal it redraws at most every 10 s, so CI logs stay short."""
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        return tqdm(iterable, total=total, desc=f"[{self.stage_id}] {desc}".strip(), unit=unit, file=sys.stderr,
                    mininterval=0.5 if tty else 10.0, dynamic_ncols=True, leave=tty, **kw)


def pick_device(want: str = "auto") -> str:
    """``auto``: cuda when available, else cpu. ``cpu``, ``cuda`` or ``cuda:N`` as given; a cuda
    device on a machine without one is an Sd2Error (not a traceback from the first .to())."""
    import torch

    if want == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", want):
        raise Sd2Error(f"device {want!r} is not one of auto, cpu, cuda, cuda:N")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise Sd2Error(f"device {want!r} was asked for, but torch sees no CUDA device here; use cpu or auto")
    return want


def rank_world() -> tuple[int, int]:
    """This process's rank and the world size, as torchrun and accelerate launch set them
    (``RANK``, ``WORLD_SIZE``); (0, 1) for a plain single process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def standalone_context(tmp: Path | None = None, seed: int = 0, stage_id: str = "test") -> StageContext:
    """A context for calling a stage's run() directly (tests, benchmarks, `sd2 eval`)."""
    return StageContext(seed=seed, device="cpu", log=logging.getLogger("sd2"), stage_id=stage_id,
                        metrics_path=(tmp / "metrics.jsonl") if tmp else None, run_dir=tmp)


class PeakRSS:
    """Samples this process's resident memory while a stage runs (the stage's own peak, not the process's)."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()

    @staticmethod
    def _rss_kb() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        return 0

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_kb = max(self.peak_kb, self._rss_kb())

    def __enter__(self) -> "PeakRSS":
        self.peak_kb = self._rss_kb()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self._rss_kb())

    @property
    def peak_mb(self) -> float:
        return round(self.peak_kb / 1024, 1)
