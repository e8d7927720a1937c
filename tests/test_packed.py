"""sd2.engine.packed: prepacked oneDNN Linears give the unpacked model's numbers, follow training,
pass gradients, copy, and switch off. The engine's own tests (greedy equality, chi-square, trees)
run through packed targets and drafters, since CachedLM and HeadProposer pack on CPU."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from sd2.engine import packed
from sd2.engine.cached import CachedLM
from sd2.engine.packed import pack_linears


@pytest.fixture()
def pair(tiny_target):
    """(a model that gets packed, an untouched copy of it)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_target).eval()
    return model, copy.deepcopy(model)


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]


def _packed(mod) -> bool:
    return getattr(mod.__dict__.get("forward"), "__func__", None) is packed._forward


def test_cached_lm_packs_every_linear_and_logits_match(pair):
    model, ref = pair
    lm = CachedLM(model)
    assert lm.packed == len(_linears(model)) > 0 and all(_packed(m) for m in _linears(model))
    ids = torch.randint(5, 200, (1, 11))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert pack_linears(model) == lm.packed          # idempotent: nothing packed twice


def test_verify_forward_through_packed_target_equals_one_token_at_a_time(pair):
    model, ref = pair
    lm, plain = CachedLM(model), CachedLM(ref)
    plain_forward = [m.forward for m in _linears(ref)]
    prompt, draft = list(range(10, 30)), [40, 41, 42, 43]
    with torch.no_grad():
        lm.prefill(prompt)
        block = lm.verify([7] + draft)[0]
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(packed.ENV, "0")
            plain = CachedLM(ref)                    # off: the copy stays unpacked
        assert plain.packed == 0 and [m.forward for m in _linears(ref)] == plain_forward
        plain.prefill(prompt)
        steps = torch.stack([plain.forward([t])[0] for t in [7] + draft])
    assert torch.allclose(block, steps, atol=1e-4, rtol=1e-4)


def test_packed_linear_follows_in_place_training_and_passes_gradients(pair):
    model, ref = pair
    pack_linears(model)
    lin, lin_ref = model.model.layers[0].mlp.down_proj, ref.model.layers[0].mlp.down_proj
    x = torch.randn(3, lin.in_features)
    with torch.no_grad():
        before = lin(x)
    # gradients: the packed op has no backward, so training falls back to F.linear
    lin(x).square().sum().backward()
    lin_ref(x).square().sum().backward()
    assert lin.weight.grad is not None and torch.allclose(lin.weight.grad, lin_ref.weight.grad, atol=1e-5)
    for m in (lin, lin_ref):
        torch.optim.SGD(m.parameters(), lr=0.5).step()      # in place: the packed copy is now stale
    with torch.no_grad():
        got, want = lin(x), lin_ref(x)
    assert not torch.allclose(got, before, atol=1e-3)        # not the stale packed weight
    assert torch.allclose(got, want, atol=1e-5)              # repacked from the trained weight
    lin.weight = torch.nn.Parameter(torch.zeros_like(lin.weight))   # a replaced weight is repacked too
    with torch.no_grad():
        assert torch.count_nonzero(lin(x)) == 0


def test_a_packed_model_deep_copies_and_the_copy_is_its_own(pair):
    model, _ = pair
    pack_linears(model)
    twin = copy.deepcopy(model)                  # a oneDNN tensor has no storage: it is kept off the module
    ids = torch.randint(5, 200, (1, 6))
    with torch.no_grad():
        before = model(ids).logits
        for p in twin.parameters():
            p.mul_(0.5)
        assert torch.equal(model(ids).logits, before)
        assert not torch.allclose(twin(ids).logits, before)


def test_only_float32_cpu_linears_are_packed(pair):
    model, _ = pair
    assert pack_linears(model.to(torch.bfloat16)) == 0
    assert not any(_packed(m) for m in _linears(model))


def test_a_linear_subclass_keeps_its_own_forward(pair):
    class Scaled(torch.nn.Linear):       # e.g. a compressed or LoRA Linear: its forward is not F.linear
        def forward(self, x):
            return 2 * super().forward(x)

    model, _ = pair
    lin = model.model.layers[0].mlp.down_proj
    scaled = Scaled(lin.in_features, lin.out_features, bias=False)
    model.model.layers[0].mlp.down_proj = scaled
    n = len(_linears(model))
    assert pack_linears(model) == n - 1 and not _packed(scaled)
    x = torch.randn(2, lin.in_features)
    with torch.no_grad():
        assert torch.allclose(scaled(x), 2 * torch.nn.functional.linear(x, scaled.weight))
