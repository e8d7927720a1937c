"""EAGLE-3 heads on tiny models: shapes, causality, the training-time test, learning, the draft
vocabulary, and the speculators export against vLLM's loader contract (docs/eagle3.md)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sd2.heads.eagle3 import (DraftVocabMap, Eagle3Config, build, choose_draft_vocab, resolve_aux_layers, target_aux,
                              training_time_test, ttt_unroll)
from sd2.heads.eagle3 import export as e3export
from tests.tiny import learnable_target

AUX = [1, 2, 3]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A 4-layer tiny Llama (hidden 64, V = 320): the smallest target with three distinct aux layers."""
    return learnable_target(tmp_path_factory.mktemp("e3") / "target", n_layers=4)


def _rows(n: int, length: int, seed: int, prompt: int = 6):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (n, length), generator=g)
    mask = torch.zeros_like(ids)
    mask[:, prompt:] = 1
    return ids, mask


def _head(target, k: int = 200, seed: int = 0, **kw):
    ids, mask = _rows(16, 20, 99)
    return build(target, choose_draft_vocab(ids.tolist(), mask.tolist(), 320, k), aux_layers=AUX, seed=seed, **kw)


# -- aux layers ------------------------------------------------------------------------------------
def test_aux_layers_default_and_errors_name_the_field():
    assert resolve_aux_layers(None, 30) == (2, 15, 27)          # SmolLM2's 30 layers
    assert resolve_aux_layers([1, 2, 3], 4) == (1, 2, 3)
    with pytest.raises(ValueError, match=r"aux_layers the default .*\[2, 3, 3\] collide.*e\.g\. \[3, 4, 5\]"):
        resolve_aux_layers(None, 6)                               # N < 7: the default collides
    with pytest.raises(ValueError, match=r"aux_layers .*\[2, 2, 1\]"):
        resolve_aux_layers(None, 4)
    with pytest.raises(ValueError, match=r"aux_layers \[1, 2, 4\] fall outside the target's 4 decoder layers"):
        resolve_aux_layers([1, 2, 4], 4)
    with pytest.raises(ValueError, match=r"aux_layers \[0, 1, 2\] fall outside"):
        resolve_aux_layers([0, 1, 2], 4)
    with pytest.raises(ValueError, match=r"aux_layers \[3, 2, 1\] collide or are out of order"):
        resolve_aux_layers([3, 2, 1], 4)
    with pytest.raises(ValueError, match=r"aux_layers \[1, 2\]: EAGLE-3 fuses exactly 3"):
        resolve_aux_layers([1, 2], 4)
    with pytest.raises(ValueError, match=r"needs at least 4 decoder layers"):
        resolve_aux_layers(None, 3)


def test_config_for_target_refuses_the_colliding_default(target):
    with pytest.raises(ValueError, match="aux_layers"):
        Eagle3Config.for_target(target.config, 64)               # N = 4: (2, 2, 1)
    c = Eagle3Config.for_target(target.config, 64, aux_layers=AUX)
    assert Eagle3Config.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_target_aux_is_the_hidden_state_after_k_layers(target):
    ids, _ = _rows(2, 9, 0)
    aux, logits = target_aux(target, ids, AUX)
    with torch.no_grad():
        hs = target.model(input_ids=ids, output_hidden_states=True).hidden_states   # [k] = after k layers
    assert aux.shape == (2, 9, 3 * 64) and logits.shape == (2, 9, 320)
    assert torch.equal(aux, torch.cat([hs[1], hs[2], hs[3]], dim=-1))
    assert torch.equal(logits, target(ids).logits)


def test_a_qwen2_target(tmp_path, tokenizer):
    """Any Llama-family target: a Qwen2 (q/k/v biases, its own rope base) gives aux states, a head and a forward."""
    from transformers import AutoModelForCausalLM

    from tests.tiny import make_model

    qwen = AutoModelForCausalLM.from_pretrained(make_model(tmp_path / "q", "qwen2", n_layers=5, tokenizer=tokenizer))
    ids, mask = _rows(2, 10, 0)
    aux, logits = target_aux(qwen, ids, [2, 3, 4])
    head = build(qwen, choose_draft_vocab(ids.tolist(), mask.tolist(), len(tokenizer), 32), aux_layers=[2, 3, 4])
    res = training_time_test(head, aux, ids, mask, logits, depth=2, loss="fkl")
    assert aux.shape == (2, 10, 192) and res.step_positions == [4 * 2, 4 * 2]
    assert head.head_config.rope_theta == float(qwen.config.rope_parameters["rope_theta"])


# -- the module ------------------------------------------------------------------------------------
def test_shapes_and_parameter_names(target):
    head = _head(target, k=100)
    assert set(head.state_dict()) == set(e3export.speculators_tensors(head.head_config))
    for name, shape in e3export.speculators_tensors(head.head_config).items():
        assert tuple(head.state_dict()[name].shape) == shape, name
    assert not any(n.startswith("embed") for n in head.state_dict())         # the target's, shared
    assert head.layers[0].self_attn.q_proj.in_features == 128                  # [embedding; hidden] = 2H
    ids, _ = _rows(3, 7, 1)
    prenorm, normed = head(ids, torch.randn(3, 7, 64), torch.arange(7).expand(3, 7))
    assert prenorm.shape == normed.shape == (3, 7, 64)
    assert head.logits(normed).shape == (3, 7, 100)
    with pytest.raises(ValueError, match=r"fused target hidden states are 128 wide, the head's fc reads 192"):
        head.fuse(torch.randn(1, 2, 128))


def test_fresh_head_reads_the_targets_output_layer(target):
    """lm_head starts as the target's rows of the draft vocabulary, norm as its final norm."""
    head = _head(target, k=50)
    keep = head.draft_to_target()
    assert torch.equal(head.lm_head.weight, target.lm_head.weight[keep])
    assert torch.equal(head.norm.weight, target.model.norm.weight)


@pytest.mark.parametrize("feature_sampling", [False, True])
def test_causal_bitwise_forward_and_training_time_test(target, feature_sampling):
    """Editing position p (its token and its hidden/aux input) leaves every output before p bitwise
    unchanged, in a plain forward and at every step of the training-time test."""
    head = _head(target, feature_sampling=feature_sampling)
    ids, mask = _rows(2, 12, 3)
    hid = torch.randn(2, 11, 64)
    pos = torch.arange(11).expand(2, 11)
    p = 6
    ids2, hid2 = ids.clone(), hid.clone()
    ids2[:, p + 1] = (ids2[:, p + 1] + 1) % 300 + 3                          # head position p reads x_{p+1}
    hid2[:, p] += 1.0
    with torch.no_grad():
        a, _ = head(ids[:, 1:], hid, pos)
        b, _ = head(ids2[:, 1:], hid2, pos)
        assert torch.equal(a[:, :p], b[:, :p]) and not torch.equal(a[:, p], b[:, p])
        aux, _ = target_aux(target, ids, AUX)
        aux2 = aux.clone()
        aux2[:, p] += 1.0
        s1 = [o for o, _ in ttt_unroll(head, head.fuse(aux[:, :-1]), ids, 4)]
        s2 = [o for o, _ in ttt_unroll(head, head.fuse(aux2[:, :-1]), ids, 4)]
    for i, (x, y) in enumerate(zip(s1, s2)):
        assert torch.equal(x[:, :p], y[:, :p]), i
        assert not torch.equal(x[:, p], y[:, p]), i


def test_fed_back_steps_equal_drafting_with_a_kv_cache(target):
    """Step i at anchor t of the training-time test is exactly the (i+1)-th draft of a round that
    starts at t: the head run over positions 0..t, then fed its own prenorm output and the next
    token at position t+1, t+2, ... with its KV cache."""
    head = _head(target)
    ids, _ = _rows(1, 14, 5)
    with torch.no_grad():
        aux, _ = target_aux(target, ids, AUX)
        fused = head.fuse(aux[:, :-1])
        steps = list(ttt_unroll(head, fused, ids, 3))
        for t in (0, 4, 9):
            cache = head.new_cache()
            h, n = head(ids[:, 1: t + 2], fused[:, : t + 1], torch.arange(t + 1)[None], cache=cache)
            g, normed = h[:, -1:], n[:, -1:]
            for i in range(3):
                if i:
                    g, normed = head(ids[:, t + 1 + i: t + 2 + i], g, torch.tensor([[t + i]]), cache=cache)
                torch.testing.assert_close(normed[0, 0], steps[i][1][0, t], rtol=1e-5, atol=1e-5)


def test_training_time_test_feeds_the_heads_own_outputs(target):
    """Step 1 at anchor t reads the head's step-0 output at t, not the target's fused state at t+1:
    changing the target's aux hidden states at position t+1 changes step 0 there but leaves step 1
    at t bitwise unchanged (a version that fed the target's features would change it)."""
    head = _head(target)
    ids, _ = _rows(1, 12, 4)
    t = 5
    with torch.no_grad():
        aux, _ = target_aux(target, ids, AUX)
        aux2 = aux.clone()
        aux2[:, t + 1] *= -1.0
        a = [n for _, n in ttt_unroll(head, head.fuse(aux[:, :-1]), ids, 2)]
        b = [n for _, n in ttt_unroll(head, head.fuse(aux2[:, :-1]), ids, 2)]
    assert not torch.equal(a[0][:, t + 1], b[0][:, t + 1])
    assert torch.equal(a[1][:, t], b[1][:, t])


# -- the loss --------------------------------------------------------------------------------------
def test_loss_mask_shifts_with_the_ids(target):
    """At step i, anchor t is trained on x_{t+2+i} under loss_mask[t+2+i]. Every answer token is a
    label at every step (the first one from an anchor inside the prompt), and the CE equals the
    one computed by hand position by position. An unshifted mask (SpecForge #885) would train
    answer - i positions at step i, dropping the boundary."""
    head = _head(target, k=320)                                      # every token in the draft vocabulary
    prompt, answer, depth = 6, 7, 4
    ids, mask = _rows(1, prompt + answer, 6, prompt=prompt)
    with torch.no_grad():
        aux, _ = target_aux(target, ids, AUX)
        res = training_time_test(head, aux, ids, mask, depth=depth, decay=0.5)
        steps = [n for _, n in ttt_unroll(head, head.fuse(aux[:, :-1]), ids, depth)]
    assert res.step_positions == [answer] * depth
    want = 0.0
    for i in range(depth):
        rows = [t for t in range(ids.shape[1] - 1) if t + 2 + i < ids.shape[1] and mask[0, t + 2 + i]]
        assert rows[0] == prompt - 2 - i                             # the boundary: label x_prompt
        logits = head.logits(steps[i][0, rows])
        ce = F.cross_entropy(logits, ids[0, [t + 2 + i for t in rows]], reduction="sum")   # K = V: ids are draft ids
        torch.testing.assert_close(torch.tensor(res.step_loss[i]), ce, rtol=1e-5, atol=1e-5)
        want += 0.5 ** i * float(ce.detach())
    assert res.loss_sum.item() == pytest.approx(want, rel=1e-5)


def test_kd_loss_is_zero_against_the_heads_own_distribution(target):
    """fkl against a teacher that equals the head on the draft vocabulary is 0; CE on labels outside
    the draft vocabulary counts the position, adds no loss, and is never 'correct'."""
    head = _head(target, k=100)
    ids, mask = _rows(2, 10, 7)
    with torch.no_grad():
        aux, _ = target_aux(target, ids, AUX)
        _, normed = next(ttt_unroll(head, head.fuse(aux[:, :-1]), ids, 1))
        teacher = torch.full((2, 10, 320), -1e4)
        keep = head.draft_to_target()
        teacher[:, 1:, keep] = head.logits(normed)                  # position t+1's distribution = anchor t's
        res = training_time_test(head, aux, ids, mask, teacher, depth=1, loss="fkl")
    assert res.step_positions == [8] and abs(res.loss_sum.item()) < 1e-4
    outside = torch.nonzero(~head.t2d)[:, 0]
    ids_out = ids.clone()
    ids_out[:, 2:] = outside[0]
    with torch.no_grad():
        res = training_time_test(head, aux, ids_out, mask, depth=2)
    assert res.step_positions == [8, 8] and res.loss_sum.item() == 0.0 and res.step_correct == [0, 0]
    with pytest.raises(ValueError, match="needs the target's logits"):
        training_time_test(head, aux, ids, mask, depth=1, loss="jsd")
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        training_time_test(head, aux, ids, mask, depth=1, loss="mse")


def test_acceptance_counts_only_chains_that_were_right_so_far():
    """Per-step acceptance is conditional on every earlier draft of the anchor being right."""
    from sd2.heads.eagle3.ttt import TTTResult

    r = TTTResult(torch.zeros(()), step_positions=[10, 9], step_correct=[5, 6], step_candidates=[10, 5],
                  step_accepted=[5, 2])
    assert r.accuracy() == [0.5, 6 / 9] and r.acceptance() == [0.5, 0.4]
    assert r.mal() == pytest.approx(1 + 7 / 10) and r.mal(1) == pytest.approx(1.5)
    from sd2.heads.eagle3.ttt import merge, summary

    both = merge([r, TTTResult(torch.ones(()), step_positions=[2], step_correct=[2], step_candidates=[2],
                               step_accepted=[2])])
    assert both.step_positions == [12, 9] and both.step_accepted == [7, 2] and both.loss_sum.item() == 1.0
    s = summary(both)
    assert s["val_acceptance_1"] == 7 / 12 and s["val_acceptance_2"] == 0.4 and s["val_ttt_positions"] == 12
    assert s["val_ttt_mal"] == pytest.approx(1 + 9 / 12)


def test_head_learns_the_targets_next_token(target):
    """A real learning test: 200 AdamW steps of the training-time test (depth 2, fkl against the
    target's distribution) over random contexts; on held-out contexts the head's greedy token (step
    0, mapped through d2t) is the target's own greedy token far above chance (1/128 over the draft
    vocabulary) and above the fresh head. Thresholds leave wide margins for other CPUs' numerics."""
    ids, mask = _rows(288, 36, 0)
    with torch.no_grad():
        aux, logits = target_aux(target, ids, AUX)
    greedy = logits.argmax(-1)
    vmap = choose_draft_vocab(greedy[:256].tolist(), None, 320, 128)   # the target's most frequent outputs
    head = build(target, vmap, aux_layers=AUX, seed=0)

    def top1() -> float:
        with torch.no_grad():
            _, normed = next(ttt_unroll(head, head.fuse(aux[256:, :-1]), ids[256:], 1))
            pred = head.draft_to_target()[head.logits(normed).argmax(-1)]
        return float((pred[:, 5:] == greedy[256:, 6:]).float().mean())   # anchor t predicts the target's token at t+1

    before = top1()
    opt = torch.optim.AdamW(head.parameters(), lr=3e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = torch.randint(0, 256, (16,), generator=g)
        res = training_time_test(head, aux[idx], ids[idx], mask[idx], logits[idx], depth=2, loss="fkl")
        (res.loss_sum / res.positions).backward()
        opt.step()
        opt.zero_grad()
    after = top1()
    assert after > 0.07 and after > 4 * before, (before, after)
    assert not target.model.embed_tokens.weight.requires_grad


# -- the draft vocabulary --------------------------------------------------------------------------
def test_draft_vocab_by_frequency_ties_and_fill():
    seqs = [[5, 5, 5, 7, 7, 9, 1], [9, 4, 4, 4]]
    masks = [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1]]                   # the 1 is a prompt token: not counted
    assert choose_draft_vocab(seqs, masks, 12, 2).keep.tolist() == [4, 5]          # 3 x 4 and 3 x 5
    assert choose_draft_vocab(seqs, masks, 12, 3).keep.tolist() == [4, 5, 7]       # 7 and 9 tie: the lower id
    assert choose_draft_vocab(seqs, masks, 12, 6).keep.tolist() == [0, 1, 4, 5, 7, 9]   # topped up: lowest unseen
    assert choose_draft_vocab(seqs, masks, 12, 2, always=[11]).keep.tolist() == [4, 11]
    with pytest.raises(ValueError, match=r"draft_vocab_size 13 must be in \[1, 12\]"):
        choose_draft_vocab(seqs, masks, 12, 13)
    with pytest.raises(ValueError, match=r"token id 12, outside the target vocabulary \[0, 12\)"):
        choose_draft_vocab([[12]], None, 12, 2)


def test_d2t_round_trip_and_engine_mapping():
    from sd2.engine.sampling import DraftVocab

    vmap = DraftVocabMap(torch.tensor([2, 3, 7, 11]), 16)
    d2t, t2d = vmap.d2t(), vmap.t2d()
    assert d2t.tolist() == [2, 2, 5, 8] and d2t.dtype == torch.long          # target id = draft id + d2t[draft id]
    assert t2d.dtype == torch.bool and torch.nonzero(t2d)[:, 0].tolist() == [2, 3, 7, 11]
    assert vmap.target_to_draft()[[2, 7, 4]].tolist() == [0, 2, -1]
    back = DraftVocabMap.from_buffers(d2t, t2d)
    assert torch.equal(back.keep, vmap.keep) and back.target_vocab_size == 16
    logits = torch.tensor([0.1, 0.2, 3.0, 0.0])
    assert DraftVocab(16, torch.arange(4) + d2t).greedy(logits) == 7
    bad = t2d.clone()
    bad[5] = True
    with pytest.raises(ValueError, match="d2t and t2d disagree"):
        DraftVocabMap.from_buffers(d2t, bad)
    with pytest.raises(ValueError, match="strictly ascending"):
        DraftVocabMap(torch.tensor([3, 2]), 16)


def test_a_map_for_another_vocabulary_is_refused(target, tmp_path):
    """speculators #1081: a map cached for one vocabulary reused for another. Refused by name."""
    saved = tmp_path / "draft_vocab.json"
    DraftVocabMap(torch.tensor([1, 4, 9]), 320).save(saved)
    assert DraftVocabMap.load(saved, 320).keep.tolist() == [1, 4, 9]
    with pytest.raises(ValueError, match=r"draft_vocab.json: this draft vocabulary map .* made for a target "
                                         r"vocabulary of 320 tokens, but the target has 49152"):
        DraftVocabMap.load(saved, 49152)
    saved.write_text("{}")
    with pytest.raises(ValueError, match=r"draft_vocab.json: not a readable draft vocabulary map"):
        DraftVocabMap.load(saved, 320)
    head = _head(target, k=10)
    other = DraftVocabMap(torch.arange(10), 49152)
    with pytest.raises(ValueError, match=r"made for a target vocabulary of 49152 tokens, but the target has 320"):
        head.set_draft_vocab(other)
    with pytest.raises(ValueError, match=r"made for a target vocabulary of 49152"):
        build(target, other, aux_layers=AUX)
    with pytest.raises(ValueError, match=r"holds 12 tokens, the head's lm_head has draft_vocab_size = 10"):
        head.set_draft_vocab(DraftVocabMap(torch.arange(12), 320))


# -- export: the speculators layout against vLLM's loader --------------------------------------------
def _vllm_params(cfg: dict) -> dict[str, tuple[int, ...]]:
    """vLLM 0.32.0's Eagle3LlamaForCausalLM parameters for a speculators config (one layer), as its
    model code builds them: qkv/gate_up stacked, fc over 3 x target_hidden_size, no fc bias."""
    lc = cfg["transformer_layer_config"]
    h, hd, nh, kv, inter = lc["hidden_size"], lc["head_dim"], lc["num_attention_heads"], lc["num_key_value_heads"], \
        lc["intermediate_size"]
    k = cfg["draft_vocab_size"]
    p = "model.layers.0."
    out = {"model.fc.weight": (h, 3 * cfg["target_hidden_size"]), p + "hidden_norm.weight": (h,),
           p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
           p + "self_attn.qkv_proj.weight": ((nh + 2 * kv) * hd, 2 * h), p + "self_attn.o_proj.weight": (h, nh * hd),
           p + "mlp.gate_up_proj.weight": (2 * inter, h), p + "mlp.down_proj.weight": (h, inter),
           "model.norm.weight": (h,), "lm_head.weight": (k, h)}
    if k != lc["vocab_size"]:
        out["draft_id_to_target_id"] = (k,)
    return out


def _vllm_load(tensors: dict[str, torch.Tensor], cfg: dict) -> dict[str, torch.Tensor]:
    """vLLM 0.32.0's renaming (Eagle3LlamaForCausalLM.load_weights + its WeightsMapper): drop t2d,
    d2t -> draft_id_to_target_id, 'model.' before all but lm_head, midlayer -> layers.0, q/k/v and
    gate/up stacked. Raises KeyError for a name vLLM has no parameter for (its loader fails)."""
    params = _vllm_params(cfg)
    shards: dict[str, list] = {}
    for name, w in tensors.items():
        if "t2d" in name:
            continue
        if "d2t" in name:
            name = name.replace("d2t", "draft_id_to_target_id")
        elif "lm_head" not in name:
            name = "model." + name
        name = name.replace("midlayer.", "layers.0.")
        for old, new, order in ((".q_proj", ".qkv_proj", 0), (".k_proj", ".qkv_proj", 1), (".v_proj", ".qkv_proj", 2),
                                (".gate_proj", ".gate_up_proj", 0), (".up_proj", ".gate_up_proj", 1)):
            if old in name:
                name = name.replace(old, new)
                break
        else:
            order = 0
        if name not in params:
            raise KeyError(f"vLLM has no parameter {name}")
        shards.setdefault(name, []).append((order, w))
    return {n: torch.cat([w for _, w in sorted(s, key=lambda x: x[0])], dim=0) for n, s in shards.items()}


def test_export_matches_vllms_loader_contract(target, tmp_path):
    from safetensors.torch import load_file
    from transformers import LlamaConfig

    head = _head(target, k=100)
    cfg = e3export.export(head, tmp_path / "e3", verifier_name_or_path="org/target", speculative_tokens=4)
    on_disk = json.loads((tmp_path / "e3" / "config.json").read_text())
    assert on_disk == cfg and "model_type" not in cfg
    assert cfg["speculators_model_type"] == "eagle3" and cfg["architectures"] == ["Eagle3Speculator"]
    sc = cfg["speculators_config"]                                    # what vLLM's SpeculatorsConfig validates
    assert sc["algorithm"] == "eagle3" and sc["default_proposal_method"] == "greedy"
    assert sc["proposal_methods"][0]["proposal_type"] == "greedy" and sc["proposal_methods"][0]["speculative_tokens"] == 4
    assert sc["verifier"] == {"name_or_path": "org/target", "architectures": ["LlamaForCausalLM"]}
    assert cfg["draft_vocab_size"] == 100 and cfg["target_hidden_size"] == 64
    assert cfg["eagle_aux_hidden_state_layer_ids"] == AUX
    for flag in ("norm_before_residual", "norm_before_fc", "fc_norm", "norm_output"):   # written, never defaulted
        assert cfg[flag] is False, flag
    layer = LlamaConfig(**cfg["transformer_layer_config"])
    assert (layer.hidden_size, layer.head_dim, layer.num_hidden_layers, layer.vocab_size) == (64, 16, 1, 320)
    assert layer.rope_parameters["rope_theta"] == head.head_config.rope_theta
    tensors = load_file(str(tmp_path / "e3" / e3export.WEIGHTS))
    loaded = _vllm_load(tensors, cfg)
    want = _vllm_params(cfg)
    assert set(loaded) == set(want)                                   # every vLLM parameter, nothing else
    for name, shape in want.items():
        assert tuple(loaded[name].shape) == shape, name
    assert tensors["d2t"].dtype == torch.long and tensors["t2d"].dtype == torch.bool
    assert torch.equal(torch.arange(100) + loaded["draft_id_to_target_id"], head.draft_to_target())
    from sd2.core.errors import Sd2Error
    from sd2.serve.env import check_head_dim

    with pytest.raises(Sd2Error, match="head_dim 16"):            # read from a speculators folder's layer config
        check_head_dim(str(tmp_path / "e3"))


def test_export_round_trip_and_refusals(target, tmp_path):
    head = _head(target, k=100).eval()
    e3export.export(head, tmp_path / "a", verifier_name_or_path="org/target")
    back = e3export.load(tmp_path / "a", target)
    ids, _ = _rows(1, 8, 2)
    hid = torch.randn(1, 8, 64)
    with torch.no_grad():
        assert torch.equal(head(ids, hid, torch.arange(8)[None])[1], back(ids, hid, torch.arange(8)[None])[1])
    assert torch.equal(back.d2t, head.d2t) and torch.equal(back.t2d, head.t2d)
    full = _head(target, k=320)                                       # K = V: no d2t (vLLM 0.32 would refuse it)
    cfg = e3export.export(full, tmp_path / "b", verifier_name_or_path="org/target")
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / "b" / e3export.WEIGHTS))
    assert "d2t" not in tensors and set(_vllm_load(tensors, cfg)) == set(_vllm_params(cfg))
    assert torch.equal(e3export.load(tmp_path / "b", target).draft_to_target(), torch.arange(320))
    with pytest.raises(ValueError, match="feature sampling, a block vLLM's EAGLE-3 model does not have"):
        e3export.export(_head(target, feature_sampling=True), tmp_path / "c", verifier_name_or_path="x")
    with pytest.raises(ValueError, match="verifier .* is unknown: pass verifier_name_or_path"):
        e3export.export(head, tmp_path / "d")
    from tests.tiny import make_model
    from transformers import AutoModelForCausalLM
    from tests.tiny import make_tokenizer
    other = AutoModelForCausalLM.from_pretrained(make_model(tmp_path / "o", n_layers=4, tokenizer=make_tokenizer(300)))
    with pytest.raises(ValueError, match=r"made for a target vocabulary of 320 tokens, the given target has 300"):
        e3export.load(tmp_path / "a", other)
