"""Check what pruning did and write ``sparsity.json`` (the measurement itself: sd2/sparsity.py).

"Decoder linear" is defined once, in sd2/sparsity.py: the layers pruning targets and sd2.macs counts
by their nonzeros. lm_head and the embeddings must stay dense;
``DenseGuard`` checks that nothing leaked into them (with tied embeddings they are one tensor).
"""

from __future__ import annotations

import json
from pathlib import Path

SPARSITY_FILE = "sparsity.json"


class DenseGuard:
    """Nonzero counts of the embeddings and lm_head before pruning; ``check`` raises if they dropped.

    Pruning only zeroes weights, so a leak into these tensors shows as fewer nonzeros. Counting is
    cheap and holds no copy of the (large) embedding matrix.
    """

    def __init__(self, model):
        self.before = self._counts(model)

    @staticmethod
    def _counts(model) -> dict[str, int]:
        import torch

        out = {}
        for role, mod in (("embeddings", model.get_input_embeddings()), ("lm_head", model.get_output_embeddings())):
            if mod is not None:
                out[role] = int(torch.count_nonzero(mod.weight.detach()))
        return out

    def check(self, model) -> dict[str, bool]:
        from sd2.core.errors import Sd2Error

        after = self._counts(model)
        leaked = [role for role, n in self.before.items() if after.get(role, n) < n]
        if leaked:
            raise Sd2Error(f"pruning zeroed weights of {', '.join(leaked)}, which SD² keeps dense; "
                           "a raw recipe must ignore them, e.g. ignore: ['re:.*lm_head']")
        return {f"{role}_dense": True for role in self.before}


def write(out_dir: Path, *, method: str, structure: str, target_sparsity: float | None, measured: dict,
          removed_layers: list[int], peak_rss_mb: float, extra: dict | None = None) -> Path:
    doc = {
        "method": method,
        "structure": structure,
        "target_sparsity": target_sparsity,
        "decoder_sparsity": round(measured["decoder_sparsity"], 6),
        "layers": measured["layers"],
        "removed_layers": removed_layers,
        "lm_head_dense": True,      # DenseGuard.check passed before this is written
        "embeddings_dense": True,
        "peak_rss_mb": peak_rss_mb,
        **(extra or {}),
    }
    path = Path(out_dir) / SPARSITY_FILE
    path.write_text(json.dumps(doc, indent=2))
    return path
