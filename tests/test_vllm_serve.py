"""sd2's exports served by vLLM (marker vllm; skipped without vLLM): a standalone drafter as
``draft_model`` and an EAGLE-1 head as ``eagle``, both exported by sd2 publish's code, loaded by vLLM's
CPU backend from the exported folders. Greedy outputs equal vLLM's target alone (lossless), and
vLLM's acceptance counters equal sd2's engine's for the same drafter, prompts and γ on the same
rounds (sd2/serve/metrics.py), within 3% of MAL; a head exported wrong (its fc's input halves
swapped, the negative control) falls far outside that.

The tolerance is there for the kernels: vLLM's CPU kernels and torch's round differently, which can
flip a near-tie argmax of the drafter; on this CPU (AMD EPYC, AVX-512) the counts matched exactly."""

from __future__ import annotations

import json

import pytest
import torch

from vllm_tiny import VLLM_ENV, _rows

pytestmark = pytest.mark.vllm

GAMMA, MAX_TOKENS = 3, 24


def _export(model_dir, dest):
    from sd2.publish.export import build
    from sd2.publish.select import Selection

    return build(Selection(model_dir=model_dir, name=model_dir.name, why="test"), dest, lambda e: "card\n",
                 target_name="tiny-target")


@pytest.fixture(scope="module")
def served(tmp_path_factory, vllm_pair):
    """Exports, the vLLM worker's results (target alone, draft_model, eagle) and sd2's engine counts."""
    from transformers import AutoModelForCausalLM

    from sd2.engine.cached import CachedLM
    from sd2.engine.drafter import DrafterProposer
    from sd2.engine.loop import target_generate
    from sd2.engine.sampling import DraftVocab
    from sd2.heads import io
    from sd2.heads.proposer import HeadProposer
    from sd2.serve.metrics import counts_of_rounds, engine_rounds_on_vllm_schedule
    from sd2.serve.worker import serve_apart

    tmp = tmp_path_factory.mktemp("vllm")
    tfold, dfold, hfold = vllm_pair["target"], vllm_pair["drafter"], vllm_pair["eagle"]
    target = AutoModelForCausalLM.from_pretrained(tfold).eval()
    d_exp, h_exp = _export(dfold, tmp / "export_drafter"), _export(hfold, tmp / "export_eagle")

    broken = _export(hfold, tmp / "export_eagle_broken").folder       # the negative control: the fc's two
    from safetensors.torch import load_file, save_file                 # input halves swapped, as a layout
                                                                       # mistake ([feature; embedding]) would
    sd = load_file(str(broken / "model.safetensors"))
    d = sd["fc.weight"].shape[0]
    sd["fc.weight"] = torch.cat([sd["fc.weight"][:, d:], sd["fc.weight"][:, :d]], dim=1).contiguous()
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})

    prompts = [p[:8 + i] for i, p in enumerate(_rows(6, 7).input_ids)]
    common = {"model": str(tfold), "prompts": prompts, "max_tokens": MAX_TOKENS, "ignore_eos": True,
              "max_model_len": 256}
    runs = [{"name": "target", **common},
            {"name": "draft_model", **common, "speculative_config": {
                "model": str(d_exp.folder), "method": "draft_model", "num_speculative_tokens": GAMMA}},
            {"name": "eagle", **common, "speculative_config": {
                "model": str(h_exp.folder), "method": "eagle", "num_speculative_tokens": GAMMA}},
            {"name": "eagle_broken", **common, "speculative_config": {
                "model": str(broken), "method": "eagle", "num_speculative_tokens": GAMMA}}]
    out = serve_apart(runs, tmp / "worker", timeout=900, env=VLLM_ENV)
    vl = {r["name"]: r for r in out["runs"]}

    tlm = CachedLM(target)
    drafter = AutoModelForCausalLM.from_pretrained(dfold).eval()
    proposers = {"draft_model": DrafterProposer("d", CachedLM(drafter), DraftVocab(target.config.vocab_size, None), set()),
                 "eagle": HeadProposer(io.load(hfold, target), set(), "eagle")}
    sd2 = {"target": [target_generate(tlm, p, MAX_TOKENS, set()).tokens for p in prompts]}
    counts = {}
    for name, prop in proposers.items():
        outs, rounds = [], []
        for p in prompts:
            toks, rs = engine_rounds_on_vllm_schedule(tlm, prop, p, GAMMA, MAX_TOKENS)
            outs.append(toks)
            rounds += rs
        sd2[name], counts[name] = outs, counts_of_rounds(rounds, GAMMA)
    report = {n: {"vllm": vl[n]["spec"], "sd2": counts[n].to_dict()} for n in counts}
    report["eagle_broken"] = {"vllm": vl["eagle_broken"]["spec"]}
    print(json.dumps(report, indent=1))
    return {"vllm": vl, "sd2": sd2, "counts": counts, "exports": (d_exp, h_exp), "out": out}


def test_vllm_target_alone_matches_sd2_greedy(served):
    vl, sd2 = served["vllm"], served["sd2"]
    assert served["out"]["cpu"] is True
    assert all(len(o) == MAX_TOKENS for o in vl["target"]["outputs"])
    same = sum(a == b for a, b in zip(vl["target"]["outputs"], sd2["target"]))
    assert same == len(sd2["target"]), f"{same} of {len(sd2['target'])} prompts equal"


@pytest.mark.parametrize("name", ["draft_model", "eagle"])
def test_vllm_serves_the_export_losslessly_with_sd2s_acceptance(served, name):
    vl, counts = served["vllm"], served["counts"][name]
    assert vl[name]["outputs"] == vl["target"]["outputs"]          # greedy speculative decoding is lossless
    assert served["sd2"][name] == served["sd2"]["target"]
    v = vl[name]["spec"]
    assert v["drafts"] > 0 and v["draft_tokens"] == GAMMA * v["drafts"]
    # the drafter is good enough that a broken export (acceptance near 0) cannot pass
    assert counts.acceptance_rate > 0.25, counts.to_dict()
    assert abs(v["mal"] - counts.mal) <= 0.03 * counts.mal, (v, counts.to_dict())
    assert abs(v["acceptance_rate"] - counts.acceptance_rate) <= 0.05, (v, counts.to_dict())


def test_a_broken_eagle_export_shows_in_vllms_acceptance(served):
    """The negative control: the same head with its fc's input halves swapped still loads in vLLM and
    stays lossless, but its acceptance falls far below sd2's engine's for the real head, outside the
    tolerance the faithful export is held to."""
    vl, good = served["vllm"], served["counts"]["eagle"]
    bad = vl["eagle_broken"]["spec"]
    assert vl["eagle_broken"]["outputs"] == vl["target"]["outputs"]
    assert abs(bad["mal"] - good.mal) > 0.03 * good.mal and bad["acceptance_rate"] < 0.5 * good.acceptance_rate, \
        (bad, good.to_dict())
