"""An optional cache of the target's features for head training (``finetune.feature_cache_mb``).

By default a head trains on features computed on the fly, one target forward per conversation
per step (features.py). With ``feature_cache_mb: N`` the finetune stage computes every
conversation's features once (train and validation rows), stores them in the run folder, and
trains from them; the training is bit-identical (tests/test_heads_prune_cache.py), because both
paths take each row's features from the same unpadded forward under the same autocast.

Layout: ``<run>/feature_cache/<key>/`` with ``index.json`` and ``shard-NNNNN.safetensors`` (tensor
``"<row>"``: [L_row, d], stored in the dtype the forward gave, or in bf16 with
``finetune.feature_cache_dtype: bf16``). ``key`` hashes what the features depend on: the target's
identity, every row's token ids (after finetune's ``max_length`` cut), the precision, the device
type, torch's version and a non-default storage dtype. Branches that train on the same data with
the same target share it. Size: sum of row lengths x d x bytes per element (576 x 4 bytes a token
for SmolLM2 in fp32, 2.3 KB; half in bf16); a cache larger than the cap is refused before anything
is computed.

Reading: rows are read from the memory-mapped shards when a batch asks for them (``CachedRows``),
not loaded up front, so the training process holds one batch of features, not the cache, and the
operating system's page cache keeps what fits. Measured on the smollm2-eagle3 recipe's 14.1 GB
cache of aux states (2-core AMD EPYC, 24 GB, 2026-12-03): loaded whole, it took the eagle3 training
to a 22.1 GB peak resident set; read on demand, 200 random batches of 8 rows held 0.30 GB and took
0.16 s a batch from disk (cold), 3.5 ms from the page cache, against 9-10 s a training step.

A row stored in bf16 is returned in the dtype the forward gave (the values rounded to bf16): with
bf16 autocast an EAGLE-3 head reads its aux states only through fc, whose autocast matmul rounds
them to bf16 anyway, so it trains bit-identically without ``feature_noise``
(tests/test_eagle3_pipeline.py); an EAGLE-1 / FSPAD head also regresses the features, which then
differ from on-the-fly ones by that rounding.

Writing: shards go to ``<key>.partial/``, each written to a temporary name and renamed; index.json
last; then the folder is renamed to ``<key>``. A killed build leaves only ``<key>.partial``, which
is never read as a cache; the next build keeps its finished shards and computes the rest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

from sd2.heads.features import row_features

FORMAT = 1
SHARD_MB = 256          # rows per shard: up to this many MB (a row is never split)


def weights_digest(model) -> str:
    """sha256 of a model's parameters and buffers (names, dtypes, bytes): the target's identity
    when the caller has no fingerprint for it."""
    h = hashlib.sha256()
    for name, t in list(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


STORED = {"bf16": torch.bfloat16, "fp32": torch.float32}     # finetune.feature_cache_dtype -> storage dtype


def cache_key(target_id: str, rows: list[list[int]], precision: str, device: str, what: str | None = None,
              stored: str | None = None) -> str:
    """The folder name: a hash of everything the cached features depend on (``what``: which states,
    when not the final-norm features; ``stored``: a storage dtype other than the forward's; None for
    either keeps the keys of caches made before it existed)."""
    import numpy as np

    meta = {"format": FORMAT, "target": target_id, "precision": precision, "device": torch.device(device).type,
            "torch": torch.__version__} | ({"what": what} if what is not None else {}) | (
        {"stored": stored} if stored is not None else {})
    h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for r in rows:
        h.update(len(r).to_bytes(8, "little"))
        h.update(np.asarray(r, dtype=np.int64).tobytes())
    return h.hexdigest()[:20]


def _shards(lengths: list[int], bytes_per_token: int) -> list[tuple[int, int]]:
    """Contiguous row ranges [a, b), each up to SHARD_MB (a longer row gets a shard of its own)."""
    out, a, size = [], 0, 0
    for i, n in enumerate(lengths):
        if size and size + n * bytes_per_token > SHARD_MB * 2**20:
            out.append((a, i))
            a, size = i, 0
        size += n * bytes_per_token
    if a < len(lengths):
        out.append((a, len(lengths)))
    return out


class CachedRows:
    """The rows of a finished cache folder, read on demand: ``rows[i]`` -> [L_i, d] CPU tensor in the
    dtype the forward gave (upcast when stored in bf16); ``rows[a:b]`` -> the same view of a range.
    Each shard is opened once, memory-mapped (safetensors ``safe_open``); nothing is read until asked."""

    def __init__(self, folder: Path, index: dict, which: range | None = None):
        self.folder, self.index = Path(folder), index
        self.which = range(index["rows"]) if which is None else which
        self.dtype = getattr(torch, index["dtype"].removeprefix("torch."))
        self._shard_of = [s for s, (a, b) in enumerate(index["shards"]) for _ in range(a, b)]
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.which)

    def __getitem__(self, i):
        if isinstance(i, slice):
            view = CachedRows.__new__(CachedRows)
            view.__dict__.update(self.__dict__)
            view.which = self.which[i]
            return view
        try:
            row = self.which[i]
        except IndexError:
            raise IndexError(f"row {i} of {len(self)} in feature cache {self.folder}") from None
        s = self._shard_of[row]
        if s not in self._open:
            from safetensors import safe_open

            path = self.folder / f"shard-{s:05d}.safetensors"
            if not path.is_file():
                from sd2.core.errors import Sd2Error

                raise Sd2Error(f"feature cache {self.folder} lost {path.name}; delete the folder and run again")
            self._open[s] = safe_open(str(path), framework="pt")
        # a copy: a tensor of the memory-mapped shard would carry an in-place edit into every later read
        return self._open[s].get_tensor(str(row)).to(self.dtype, copy=True)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getstate__(self) -> dict:
        """Pickled without its open shards (safetensors handles cannot be pickled: a DataLoader worker,
        a spawned process); the copy opens them again when it first reads."""
        return {**self.__dict__, "_open": {}}


def load_or_build(root: Path, target, target_id: str, rows: list[list[int]], precision: str, device: str,
                  max_mb: float, autocast, ctx, build: bool = True, barrier=lambda: None, compute=None,
                  what: str | None = None, stored: str | None = None) -> CachedRows:
    """The features [L_i, d] of every row (CPU tensors, read on demand: ``CachedRows``), from the cache
    under ``root``, computed and stored there first when it is not there.

    ``compute(target, rows) -> [L_i, w] per row`` (default ``row_features``) and ``what`` (a name
    entering the key) cache other per-token states the same way: an EAGLE-3 head's aux hidden states
    (sd2.heads.eagle3.train).

    ``autocast``: the training's autocast context (a callable returning a context manager), so the
    cache holds exactly what training would compute. In a multi-process run every process checks the
    cap, the main one builds (``build``), all meet at ``barrier``, then each reads the cache.
    ``stored``: "bf16" or "fp32" stores the features in that dtype (None: the forward's dtype).
    Raises Sd2Error when the cache would exceed ``max_mb``."""
    from safetensors.torch import save_file

    from sd2.core.artifacts import write_json_atomic
    from sd2.core.errors import Sd2Error

    compute = compute or row_features
    lengths = [len(r) for r in rows]
    with autocast():
        probe = compute(target, rows[:1])[0]
    keep = probe.dtype if stored is None else STORED[stored]
    key = cache_key(target_id, rows, precision, device, what, None if keep == probe.dtype else stored)
    final, partial = Path(root) / key, Path(root) / f"{key}.partial"
    size = torch.empty((), dtype=keep).element_size()
    per_token = probe.shape[-1] * size
    need_mb = sum(lengths) * per_token / 2**20
    if need_mb > max_mb:
        half = (" or store them in bf16 (finetune.feature_cache_dtype: bf16, half the size)"
                if size > 2 and keep.is_floating_point else "")
        raise Sd2Error(f"finetune.feature_cache_mb = {max_mb:g}: the target's {what or 'features'} of these {len(rows)} "
                       f"conversations ({sum(lengths)} tokens x {probe.shape[-1]} x {size} bytes) "
                       f"need {need_mb:.1f} MB; raise feature_cache_mb to at least {int(need_mb) + 1}{half}, or remove "
                       "it to compute the features on the fly")
    plan = _shards(lengths, per_token)
    if build and not (final / "index.json").is_file():
        partial.mkdir(parents=True, exist_ok=True)
        todo = [(s, ab) for s, ab in enumerate(plan) if not (partial / f"shard-{s:05d}.safetensors").is_file()]
        ctx.log.info("feature cache %s: computing the target's features of %d conversations (%.1f MB, %d shard(s), "
                     "%d to do)", final, len(rows), need_mb, len(plan), len(todo))
        bar = ctx.progress(total=sum(b - a for _, (a, b) in todo), desc="feature cache", unit="row")
        started, built = time.perf_counter(), 0
        for s, (a, b) in todo:
            with autocast():
                feats = compute(target, rows[a:b])
            path = partial / f"shard-{s:05d}.safetensors"
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_file({str(a + i): f.detach().to("cpu", keep).contiguous() for i, f in enumerate(feats)}, str(tmp))
            os.replace(tmp, path)
            bar.update(b - a)
            built += sum(lengths[a:b])
        bar.close()
        seconds = time.perf_counter() - started
        ctx.log.info("feature cache: %d tokens in %.1f s (%.0f tokens/s)", built, seconds, built / max(seconds, 1e-9))
        # this build's own time (a resumed build: the tokens it computed itself), for the data-cost figures
        write_json_atomic(partial / "index.json", {"format": FORMAT, "rows": len(rows), "tokens": sum(lengths),
                                                   "built_tokens": built, "build_seconds": round(seconds, 3),
                                                   "hidden_size": probe.shape[-1], "dtype": str(probe.dtype),
                                                   "stored_dtype": str(keep),
                                                   "mb": round(need_mb, 3), "shards": plan, "lengths": lengths})
        if final.exists():          # an earlier, broken attempt at the same key
            shutil.rmtree(final)
        os.replace(partial, final)
    barrier()
    index_path = final / "index.json"
    if not index_path.is_file():
        raise Sd2Error(f"feature cache {final} is missing its index.json (it was being built by another process "
                       "that did not finish); run again")
    index = json.loads(index_path.read_text())
    if index.get("lengths") != lengths:
        raise Sd2Error(f"feature cache {final} does not match the data (its row lengths differ); delete the folder "
                       "and run again")
    ctx.log.info("feature cache %s: %d conversations, %.1f MB (%s), read on demand", final, len(rows), index["mb"],
                 index.get("stored_dtype", index["dtype"]).removeprefix("torch."))
    return CachedRows(final, index)
