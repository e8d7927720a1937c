"""sd2.kvcache.GrowingLayer: in-place KV writes must give exactly what transformers' DynamicCache gives,
through prefill, decode steps past the reserve (growth), crop, batch selection and an adopted cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from sd2.kvcache import GrowingLayer, growing_cache


@pytest.fixture(scope="module")
def model(tiny_target):
    return AutoModelForCausalLM.from_pretrained(tiny_target).eval()


def _step(model, cache, ids, mask):
    out = model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
    return out.logits[:, -1]


@torch.inference_mode()
def test_growing_cache_matches_dynamic_cache(model):
    torch.manual_seed(0)
    b, n = 3, 7
    ids = torch.randint(5, 200, (b, n))
    mask = torch.ones(b, n, dtype=torch.long)
    mask[0, :2] = 0                                     # a left-padded row
    ref, mine = DynamicCache(config=model.config), growing_cache(model.config, reserve=2)
    assert all(isinstance(layer, GrowingLayer) for layer in mine.layers)
    a, g = _step(model, ref, ids, mask), _step(model, mine, ids, mask)
    torch.testing.assert_close(g, a, rtol=0, atol=0)
    buf = mine.layers[0]._kbuf
    for step in range(6):                               # past the reserve of 2: the buffer must grow
        tok = a.argmax(-1, keepdim=True)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        a, g = _step(model, ref, tok, mask), _step(model, mine, tok, mask)
        torch.testing.assert_close(g, a, rtol=0, atol=0)
        assert mine.get_seq_length() == ref.get_seq_length() == n + step + 1
        if step == 1:
            assert mine.layers[0]._kbuf is buf          # within the reserve: written in place, no new buffer
    assert mine.layers[0]._kbuf is not buf              # grown
    keep = torch.tensor([0, 2])                         # drop a finished row
    ref.batch_select_indices(keep)
    mine.batch_select_indices(keep)
    mask = mask[keep]
    ref.crop(-3)                                        # roll back 3 tokens, as the evaluate engine does
    mine.crop(-3)
    mask = mask[:, :-3]
    assert mine.get_seq_length() == ref.get_seq_length()
    tok = torch.tensor([[11], [12]])
    mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
    torch.testing.assert_close(_step(model, mine, tok, mask), _step(model, ref, tok, mask), rtol=0, atol=0)


@torch.inference_mode()
def test_keys_set_from_outside_are_adopted(model):
    """The distill prefill joins caches by assigning layer.keys/values; the layer must take them over."""
    ids = torch.randint(5, 200, (2, 5))
    ref, part = DynamicCache(config=model.config), DynamicCache(config=model.config)
    _step(model, ref, ids, None)
    _step(model, part, ids, None)
    mine = growing_cache(model.config, reserve=4)
    for layer, src in zip(mine.layers, part.layers):
        layer.lazy_initialization(src.keys, src.values)
        layer.keys, layer.values = src.keys.clone(), src.values.clone()
    tok = torch.tensor([[7], [9]])
    torch.testing.assert_close(_step(model, mine, tok, None), _step(model, ref, tok, None), rtol=0, atol=0)
    layer = mine.layers[0]
    assert layer._kbuf.shape[-2] == 5 + 4 and layer._len == 6 == mine.get_seq_length()   # adopted 5, reserve 4


@torch.inference_mode()
def test_dropping_rows_moves_them_in_place_and_matches_dynamic_cache(model):
    """Finished rows leave the distill batch in place: the same buffer, the kept rows' keys and
    values moved down in order; an unsorted selection gathers into new buffers. Both match
    DynamicCache exactly on the next steps."""
    torch.manual_seed(1)
    b, n = 5, 6
    ids = torch.randint(5, 200, (b, n))
    mask = torch.ones(b, n, dtype=torch.long)
    mask[3, :3] = 0
    for keep in ([1, 3, 4], [4, 0, 2]):
        ref, mine = DynamicCache(config=model.config), growing_cache(model.config, reserve=8)
        _step(model, ref, ids, mask)
        _step(model, mine, ids, mask)
        buf = mine.layers[0]._kbuf
        idx = torch.tensor(keep)
        ref.batch_select_indices(idx)
        mine.batch_select_indices(idx)
        in_place = keep == sorted(keep)
        assert (mine.layers[0]._kbuf.data_ptr() == buf.data_ptr()) == in_place
        assert mine.layers[0]._kbuf.shape[0] == len(keep) and mine.get_seq_length() == n
        m = mask[idx]
        for step in range(3):
            tok = torch.randint(5, 200, (len(keep), 1))
            m = torch.cat([m, m.new_ones((len(keep), 1))], dim=1)
            torch.testing.assert_close(_step(model, mine, tok, m), _step(model, ref, tok, m), rtol=0, atol=0)
