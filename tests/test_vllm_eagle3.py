"""An EAGLE-3 head exported in the speculators layout, served by vLLM (marker vllm; skipped without vLLM).

A tiny target (Llama, 4 layers, hidden 64, 2 heads of 32) and an EAGLE-3 head trained in the test on
the target's greedy answers. ``export`` writes the folder, and vLLM loads it with ``method: eagle3``.
Greedy outputs equal vLLM's target alone (lossless). vLLM's acceptance counters equal sd2's exact
simulation of the same greedy chain rounds on vLLM's schedule, within 3% of MAL. vLLM's kernels round
differently from torch's and can flip a near-tie argmax; on a 2-core AMD EPYC (AVX-512) the counts
matched exactly. The served prompts are training prompts: the check is of the format (aux layers, norms,
residual, d2t), not of generalisation. The negative control is the same folder without
``norm_before_residual`` in its config (vLLM then defaults it to true). It stays lossless, but its
MAL and acceptance fall outside that tolerance.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from vllm_tiny import VLLM_ENV, llama32

pytestmark = pytest.mark.vllm

GAMMA, MAX_TOKENS, AUX = 3, 24, [1, 2, 3]


def _greedy(target, prompts: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompts
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, target(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


def _vllm_schedule_counts(head, target, prompt: list[int]) -> tuple[list[int], list[int]]:
    """(the target's greedy tokens, accepted drafts per verification step) of the head as a greedy
    chain drafter on vLLM's schedule: the prefill commits the first token, every step drafts γ,
    and the last step's accepted drafts count even past ``MAX_TOKENS`` (as vLLM counts them)."""
    from sd2.heads.eagle3 import target_aux

    seq = _greedy(target, torch.tensor([prompt]), MAX_TOKENS + GAMMA)
    x, p = seq[0].tolist(), len(prompt)
    with torch.no_grad():
        aux, _ = target_aux(target, seq, AUX)
        fused = head.fuse(aux)
        rounds, n = [], p + 1
        while n < p + MAX_TOKENS:
            a, cache = n - 2, head.new_cache()                     # anchor: the last position with the target's state
            g, normed = head(seq[:, 1: a + 2], fused[:, : a + 1], torch.arange(a + 1)[None], cache=cache)
            g, normed, drafts = g[:, -1:], normed[:, -1:], []
            for i in range(GAMMA):
                if i:
                    g, normed = head(torch.tensor([[drafts[-1]]]), g, torch.tensor([[a + i]]), cache=cache)
                drafts.append(int(head.draft_to_target()[head.logits(normed[0, 0]).argmax()]))
            acc = 0
            while acc < GAMMA and drafts[acc] == x[n + acc]:
                acc += 1
            rounds.append(acc)
            n += acc + 1
    return x[p: p + MAX_TOKENS], rounds


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    from transformers import AutoModelForCausalLM

    from sd2.heads.eagle3 import build, choose_draft_vocab, target_aux, training_time_test
    from sd2.heads import io
    from sd2.heads.eagle3 import export as e3export
    from sd2.serve.metrics import SpecCounts
    from sd2.serve.worker import serve_apart

    tmp = tmp_path_factory.mktemp("vllm_e3")
    tfold = llama32(tmp / "target", tokenizer, n_layers=4)
    target = AutoModelForCausalLM.from_pretrained(tfold).eval()
    g = torch.Generator().manual_seed(0)
    ids = _greedy(target, torch.randint(3, 300, (256, 8), generator=g), 32)
    mask = torch.zeros_like(ids)
    mask[:, 8:] = 1
    with torch.no_grad():
        aux, logits = target_aux(target, ids, AUX)
    head = build(target, choose_draft_vocab(ids.tolist(), mask.tolist(), len(tokenizer), 100), aux_layers=AUX,
                 seed=0, target_ref=str(tfold))
    opt = torch.optim.AdamW(head.parameters(), lr=1e-2)
    for _ in range(300):
        idx = torch.randint(0, 256, (16,), generator=g)
        res = training_time_test(head, aux[idx], ids[idx], mask[idx], logits[idx], depth=3, loss="fkl")
        (res.loss_sum / res.positions).backward()
        opt.step()
        opt.zero_grad()
    head.eval()
    e3export.export(head, tmp / "eagle3", speculative_tokens=GAMMA)
    io.save(head, tmp / "eagle3_sd2", tokenizer)       # sd2's own folder, for sd2 eval --engine vllm
    broken = tmp / "eagle3_default_norm"
    shutil.copytree(tmp / "eagle3", broken)
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["norm_before_residual"]
    (broken / "config.json").write_text(json.dumps(cfg))

    prompts = ids[:4, :8].tolist()
    common = {"model": str(tfold), "prompts": prompts, "max_tokens": MAX_TOKENS, "ignore_eos": True,
              "max_model_len": 256}
    runs = [{"name": "target", **common}] + [
        {"name": name, **common, "speculative_config": {"model": str(folder), "method": "eagle3",
                                                          "num_speculative_tokens": GAMMA}}
        for name, folder in (("eagle3", tmp / "eagle3"), ("eagle3_default_norm", broken))]
    out = serve_apart(runs, tmp / "worker", timeout=900, env=VLLM_ENV)
    sd2_tokens, rounds = [], []
    for p in prompts:
        toks, rs = _vllm_schedule_counts(head, target, p)
        sd2_tokens.append(toks)
        rounds += rs
    per_pos = [sum(1 for a in rounds if a > i) for i in range(GAMMA)]
    counts = SpecCounts(drafts=len(rounds), draft_tokens=GAMMA * len(rounds), accepted=sum(rounds),
                        accepted_per_pos=per_pos)
    vl = {r["name"]: r for r in out["runs"]}
    print(json.dumps({"vllm": {n: vl[n]["spec"] for n in ("eagle3", "eagle3_default_norm")},
                      "sd2": counts.to_dict()}, indent=1))
    return {"vllm": vl, "sd2_tokens": sd2_tokens, "counts": counts, "target": tfold, "head": tmp / "eagle3_sd2"}


def test_vllm_serves_the_eagle3_export_losslessly_with_sd2s_acceptance(served):
    vl, counts = served["vllm"], served["counts"]
    assert vl["target"]["outputs"] == served["sd2_tokens"]            # vLLM's target alone = sd2's greedy
    assert vl["eagle3"]["outputs"] == vl["target"]["outputs"]         # greedy speculative decoding is lossless
    v = vl["eagle3"]["spec"]
    assert v["drafts"] > 0 and v["draft_tokens"] == GAMMA * v["drafts"]
    assert counts.acceptance_rate > 0.08, counts.to_dict()           # a wrongly read head accepts far less
    assert abs(v["mal"] - counts.mal) <= 0.03 * counts.mal, (v, counts.to_dict())
    assert abs(v["acceptance_rate"] - counts.acceptance_rate) <= 0.05, (v, counts.to_dict())


def test_a_missing_norm_flag_shows_in_vllms_acceptance(served):
    vl, good = served["vllm"], served["counts"]
    bad = vl["eagle3_default_norm"]["spec"]
    assert vl["eagle3_default_norm"]["outputs"] == vl["target"]["outputs"]
    # outside the tolerance the faithful export is held to (3% of MAL, 0.05 of acceptance), and lower
    assert bad["mal"] < good.mal - 0.03 * good.mal and bad["acceptance_rate"] < good.acceptance_rate - 0.05, \
        (bad, good.to_dict())


def test_sd2_eval_engine_vllm_serves_an_eagle3_head_and_ngram_at_two_gammas(served, tmp_path, monkeypatch):
    """``sd2 eval --engine vllm`` exports an sd2 eagle3 head folder in the speculators layout and serves it
    with method eagle3, sd2's engine MAL beside. vLLM's ngram runs at two γ: in vLLM 0.32 (CPU) a second
    ngram proposer started in the process of the first failed (``AttributeError: '_lib_fn_wrapper' object
    has no attribute 'get'``), so every run has a worker process of its own."""
    from sd2.core.report import Report
    from sd2.pipeline.commands import eval_command
    from tiny import write_mtbench

    for k, v in VLLM_ENV.items():
        monkeypatch.setenv(k, v)
    prompts = write_mtbench(tmp_path / "q.jsonl", n=3, turns=1)
    eval_command(str(served["target"]), [f"e3={served['head']}", "pld=prompt_lookup"], str(prompts), 3, 0,
                 tmp_path / "out", gamma=["1", "3"], max_new_tokens=MAX_TOKENS, engine="vllm")
    rep = Report.read(tmp_path / "out")
    assert rep.drafters["e3"].settings["vllm"]["method"] == "eagle3"
    exported = json.loads((tmp_path / "out" / "vllm_exports" / "e3" / "config.json").read_text())
    assert exported["speculators_model_type"] == "eagle3"
    assert {(r.drafter, r.gamma) for r in rep.results} == {("e3", 1), ("e3", 3), ("pld", 1), ("pld", 3)}
    for r in rep.results:
        assert r.lossless is True, r
    for r in rep.rows("e3"):
        assert r.drafted == r.gamma * r.target_forwards and r.acceptance_rate > 0.08, r
        assert abs(r.mal - r.sd2_mal) <= 0.03 * r.sd2_mal, (r.gamma, r.mal, r.sd2_mal)
