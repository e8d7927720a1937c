"""finetune's losses against values computed by hand (plain Python math, not the code under test)."""

import math

import pytest
import torch

from sd2.train.losses import (IGNORE, Teacher, cross_entropy, divergence, map_labels, target_to_draft_map,
                                        teacher_from_logits, teacher_from_topk)

# One position, a vocabulary of 4. The student's logits and the target's logits:
S = [1.0, 0.0, -1.0, 2.0]
T = [0.5, 2.0, -0.5, 0.0]


def softmax(xs, temp=1.0):
    e = [math.exp(x / temp) for x in xs]
    return [v / sum(e) for v in e]


def kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def hand(kind, p, q, beta=0.5):
    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q))
    m = [beta * x + (1 - beta) * y for x, y in zip(p, q)]
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_dense_teacher_matches_hand(kind, temp):
    p, q = softmax(T, temp), softmax(S, temp)
    got = divergence(kind, torch.tensor([S]), teacher_from_logits(torch.tensor([T]), temp), temp, beta=0.3 if kind == "jsd" else 0.5)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(hand(kind, p, q, beta=0.3), rel=1e-5)


def test_known_numbers():
    # Written out once so a sign or base error in the helpers above cannot hide:
    # p = softmax([0.5, 2, -0.5, 0]), q = softmax([1, 0, -1, 2])
    t = teacher_from_logits(torch.tensor([T]), 1.0)
    assert divergence("fkl", torch.tensor([S]), t).item() == pytest.approx(1.2267, abs=1e-4)
    assert divergence("tvd", torch.tensor([S]), t).item() == pytest.approx(0.6320, abs=1e-4)
    assert cross_entropy(torch.tensor([S]), torch.tensor([3])).item() == pytest.approx(0.4402, abs=1e-4)


@pytest.mark.parametrize("kind", ["fkl", "jsd", "tvd"])
def test_topk_teacher_is_exact_against_zero_tailed_p(kind):
    # Cached top-2 of the target: tokens 1 and 0, renormalised over those two; p is 0 elsewhere.
    # fkl, jsd and tvd against this p are computed over the whole vocabulary of the student.
    k_ids, k_logits = [1, 0], [T[1], T[0]]
    pk = softmax(k_logits)
    p = [pk[1], pk[0], 0.0, 0.0]
    q = softmax(S)
    teacher = teacher_from_topk(torch.tensor([k_ids]), torch.tensor([k_logits]), 1.0)
    got = divergence(kind, torch.tensor([S]), teacher, beta=0.5).item()
    assert got == pytest.approx(hand(kind, p, q), rel=1e-5)


def test_topk_rkl_renormalises_the_student_on_the_support():
    k_ids, k_logits = [1, 0], [T[1], T[0]]
    pk = softmax(k_logits)
    qk = softmax([S[1], S[0]])
    teacher = teacher_from_topk(torch.tensor([k_ids]), torch.tensor([k_logits]), 1.0)
    assert divergence("rkl", torch.tensor([S]), teacher).item() == pytest.approx(kl(qk, pk), rel=1e-5)


def test_padding_and_empty_rows_give_finite_gradients():
    # Row 0: top-3 padded to 4 (id -1); row 1: no valid entry at all (e.g. all outside a trimmed vocab).
    ids = torch.tensor([[3, 1, 0, -1], [-1, -1, -1, -1]])
    logits = torch.tensor([[2.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    teacher = teacher_from_topk(ids, logits, 1.0)
    assert teacher.rows_with_support().tolist() == [True, False]
    student = torch.tensor([S, S], requires_grad=True)
    for kind in ["fkl", "rkl", "jsd", "tvd"]:
        out = divergence(kind, student, teacher)
        assert torch.isfinite(out).all() and out[1].item() == 0.0
        (g,) = torch.autograd.grad(out.sum(), student)
        assert torch.isfinite(g).all() and g[1].abs().sum() == 0
    # the padded entry is not a fourth support token: same as the unpadded top-3
    same = teacher_from_topk(torch.tensor([[3, 1, 0]]), torch.tensor([[2.0, 1.0, 0.0]]), 1.0)
    padded = teacher_from_topk(ids[:1], logits[:1], 1.0)
    for kind in ["fkl", "rkl", "jsd", "tvd"]:
        assert divergence(kind, student[:1], padded).item() == pytest.approx(divergence(kind, student[:1], same).item())


def test_identical_distributions_give_zero():
    t = teacher_from_logits(torch.tensor([S]), 1.0)
    for kind in ["fkl", "rkl", "jsd", "tvd"]:
        assert divergence(kind, torch.tensor([S]), t).item() == pytest.approx(0.0, abs=1e-6)


def test_ce_ignores_masked_labels():
    out = cross_entropy(torch.tensor([S, S]), torch.tensor([3, IGNORE]))
    assert out[0].item() == pytest.approx(-math.log(softmax(S)[3]), rel=1e-6) and out[1].item() == 0.0


def test_trimmed_vocab_maps_labels_and_renormalises_teacher():
    # A trimmed drafter keeps target ids [1, 3] (draft ids 0, 1) of a 4-token vocabulary.
    d2t = torch.tensor([1, 3])
    t2d = target_to_draft_map(d2t, 4)
    assert t2d.tolist() == [-1, 0, -1, 1]
    assert map_labels(torch.tensor([3, 0, IGNORE, 1]), t2d).tolist() == [1, IGNORE, IGNORE, 0]
    # cached top-3 target ids 1, 0, 3: id 0 is outside the kept set, so p renormalises over {1, 3}
    teacher = teacher_from_topk(torch.tensor([[1, 0, 3]]), torch.tensor([[2.0, 0.5, 0.0]]), 1.0, t2d)
    student = torch.tensor([[S[1], S[3]]])  # the drafter's logits over its 2 kept tokens
    p, q = softmax([2.0, 0.0]), softmax([S[1], S[3]])
    assert divergence("fkl", student, teacher).item() == pytest.approx(kl(p, q), rel=1e-5)
    # online teacher: the target's full logits restricted to the kept ids and renormalised
    online = teacher_from_logits(torch.tensor([T]), 1.0, d2t)
    assert online.logp.exp()[0].tolist() == pytest.approx(softmax([T[1], T[3]]), rel=1e-6)
    assert isinstance(online, Teacher) and online.ids is None
