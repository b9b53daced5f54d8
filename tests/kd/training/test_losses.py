"""Sparse distillation losses against plain dense full-vocabulary references (float64, CPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd.training.losses import (
    StudentGather,
    distillation_loss,
    forward_kl,
    generalized_jsd,
    kept_mass_kl,
    mse_topk,
    reverse_kl,
    student_logprobs_at,
    tail_logprob,
    temper_teacher,
)

DT = torch.float64
KINDS = ("forward_kl", "reverse_kl", "jsd", "mse_topk")


# ----------------------------------------------------------------------------------- dense references

def dense_forward_kl(t_logits, s_logits):
    p, lq = F.softmax(t_logits, -1), F.log_softmax(s_logits, -1)
    return (p * (p.log() - lq)).sum(-1)


def dense_reverse_kl(t_logits, s_logits):
    return dense_forward_kl(s_logits, t_logits)


def dense_jsd(t_logits, s_logits, beta):
    p, q = F.softmax(t_logits, -1), F.softmax(s_logits, -1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)


def dense_mse(t_logits, s_logits):
    return ((s_logits - F.log_softmax(t_logits, -1)) ** 2).mean(-1)


def dense_reference(kind, t_logits, s_logits, beta=0.5):
    if kind == "forward_kl":
        return dense_forward_kl(t_logits, s_logits)
    if kind == "reverse_kl":
        return dense_reverse_kl(t_logits, s_logits)
    if kind == "jsd":
        return dense_jsd(t_logits, s_logits, beta)
    return dense_mse(t_logits, s_logits)


def sparse_loss(kind, s_lp, s_logits_k, t_lp, handling, beta=0.5):
    if kind == "forward_kl":
        return forward_kl(s_lp, t_lp, handling)
    if kind == "reverse_kl":
        return reverse_kl(s_lp, t_lp, handling)
    if kind == "jsd":
        return generalized_jsd(s_lp, t_lp, handling, beta)
    return mse_topk(s_logits_k, t_lp)


def make_case(seed, n=6, v=40, k=None, scale=2.0):
    """Teacher/student full logits [N, V], the teacher's top-K ids [N, K] (sorted descending), and both
    sides' logprobs gathered there."""
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(n, v, generator=g, dtype=DT) * scale
    s_logits = torch.randn(n, v, generator=g, dtype=DT) * scale
    t_full = F.log_softmax(t_logits, -1)
    t_lp, ids = t_full.topk(k or v, dim=-1)
    s_lp = F.log_softmax(s_logits, -1).gather(-1, ids)
    return t_logits, s_logits, ids, t_lp, s_lp


# ----------------------------------------------------------------------------------- K = V: exact

@pytest.mark.parametrize("handling", ["tail", "renormalize"])
@pytest.mark.parametrize("kind", KINDS)
def test_full_vocab_topk_equals_dense_definition(kind, handling):
    t_logits, s_logits, ids, t_lp, s_lp = make_case(0)
    got = sparse_loss(kind, s_lp, s_logits.gather(-1, ids), t_lp, handling, beta=0.3)
    want = dense_reference(kind, t_logits, s_logits, beta=0.3)
    assert want.min() > 1e-3  # the cases are not trivially zero
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------- K < V

@pytest.mark.parametrize("seed", range(8))
def test_tail_forward_kl_is_a_lower_bound_of_the_full_kl(seed):
    t_logits, s_logits, _, t_lp, s_lp = make_case(seed, k=5)
    sparse = forward_kl(s_lp, t_lp, "tail")
    full = dense_forward_kl(t_logits, s_logits)
    assert torch.all(sparse <= full + 1e-12)
    assert torch.all(sparse > 0)


def test_tail_kl_equals_the_k_plus_one_bucket_formula_by_hand():
    _, _, _, t_lp, s_lp = make_case(1, k=4)
    p, q = t_lp.exp(), s_lp.exp()
    p_t, q_t = 1 - p.sum(-1), 1 - q.sum(-1)
    fwd = (p * (t_lp - s_lp)).sum(-1) + p_t * (p_t.log() - q_t.log())
    rev = (q * (s_lp - t_lp)).sum(-1) + q_t * (q_t.log() - p_t.log())
    torch.testing.assert_close(forward_kl(s_lp, t_lp, "tail"), fwd, rtol=0, atol=1e-12)
    torch.testing.assert_close(kept_mass_kl(s_lp, t_lp), fwd, rtol=0, atol=1e-12)
    torch.testing.assert_close(reverse_kl(s_lp, t_lp, "tail"), rev, rtol=0, atol=1e-12)
    beta = 0.3
    pe, qe = torch.cat([p, p_t[:, None]], -1), torch.cat([q, q_t[:, None]], -1)
    m = beta * pe + (1 - beta) * qe
    jsd = beta * (pe * (pe / m).log()).sum(-1) + (1 - beta) * (qe * (qe / m).log()).sum(-1)
    torch.testing.assert_close(generalized_jsd(s_lp, t_lp, "tail", beta), jsd, rtol=0, atol=1e-12)


def test_renormalize_equals_kl_of_renormalized_distributions():
    _, _, _, t_lp, s_lp = make_case(2, k=6)
    p = t_lp.exp() / t_lp.exp().sum(-1, keepdim=True)
    q = s_lp.exp() / s_lp.exp().sum(-1, keepdim=True)
    torch.testing.assert_close(forward_kl(s_lp, t_lp, "renormalize"), (p * (p / q).log()).sum(-1),
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(reverse_kl(s_lp, t_lp, "renormalize"), (q * (q / p).log()).sum(-1),
                               rtol=0, atol=1e-12)
    # Student mass outside S is not penalized: shifting all student logprobs leaves the loss unchanged.
    torch.testing.assert_close(forward_kl(s_lp - 3.0, t_lp, "renormalize"),
                               forward_kl(s_lp, t_lp, "renormalize"), rtol=0, atol=1e-12)


def test_mse_topk_by_hand():
    s = torch.tensor([[1.0, -2.0, 0.5]], dtype=DT)
    t = torch.tensor([[-0.5, -1.0, -3.0]], dtype=DT)
    torch.testing.assert_close(mse_topk(s, t), torch.tensor([(1.5 ** 2 + 1.0 + 3.5 ** 2) / 3], dtype=DT))


# ----------------------------------------------------------------------------------- JSD, zeros, signs

@pytest.mark.parametrize("handling", ["tail", "renormalize"])
def test_jsd_endpoints_are_forward_and_reverse_kl(handling):
    _, _, _, t_lp, s_lp = make_case(3, k=7)
    assert torch.equal(generalized_jsd(s_lp, t_lp, handling, 0.0), forward_kl(s_lp, t_lp, handling))
    assert torch.equal(generalized_jsd(s_lp, t_lp, handling, 1.0), reverse_kl(s_lp, t_lp, handling))
    # β near 0 follows β·KL(p‖q) (the endpoints are a convention, not the limit of the formula).
    small = generalized_jsd(s_lp, t_lp, handling, 1e-6) / 1e-6
    torch.testing.assert_close(small, forward_kl(s_lp, t_lp, handling), rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(s_lp, t_lp, handling, 1.5)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("handling", ["tail", "renormalize"])
def test_losses_are_nonnegative_and_zero_when_student_equals_teacher(seed, handling):
    _, _, _, t_lp, s_lp = make_case(seed, k=5)
    for beta in (0.0, 0.2, 0.5, 0.9, 1.0):
        assert generalized_jsd(s_lp, t_lp, handling, beta).min() >= -1e-12
        torch.testing.assert_close(generalized_jsd(t_lp, t_lp, handling, beta), torch.zeros(6, dtype=DT),
                                   rtol=0, atol=1e-12)
    for fn in (forward_kl, reverse_kl):
        assert fn(s_lp, t_lp, handling).min() >= -1e-12
        assert fn(s_lp, t_lp, handling).max() > 1e-3
        torch.testing.assert_close(fn(t_lp, t_lp, handling), torch.zeros(6, dtype=DT), rtol=0, atol=1e-12)
    assert mse_topk(t_lp, t_lp).abs().max() == 0
    assert mse_topk(s_lp, t_lp).min() > 0


def test_teacher_mass_over_one_from_fp16_rounding_keeps_kl_nonnegative():
    # Kept mass 1.003 (cached fp16 rounding): the rows are scaled to mass 1, the tail is empty.
    t_lp = torch.log(torch.tensor([[0.6, 0.403]], dtype=DT))
    s_lp = torch.log(torch.tensor([[0.6, 0.3]], dtype=DT))
    t_ok = torch.log(torch.tensor([[0.6, 0.403]], dtype=DT) / 1.003)
    assert forward_kl(s_lp, t_lp, "tail").item() >= 0
    torch.testing.assert_close(forward_kl(s_lp, t_lp, "tail"), forward_kl(s_lp, t_ok, "tail"), rtol=0,
                               atol=1e-12)
    assert torch.isfinite(reverse_kl(s_lp, t_lp, "tail")).all()


def test_neg_inf_teacher_logprob_gives_finite_losses():
    t_lp = torch.tensor([[math.log(0.7), math.log(0.3), float("-inf")]], dtype=DT)
    s_lp = torch.log(torch.tensor([[0.5, 0.3, 0.1]], dtype=DT)).requires_grad_()
    for handling in ("tail", "renormalize"):
        for fn in (forward_kl, reverse_kl, generalized_jsd):
            loss = fn(s_lp, t_lp, handling)
            loss.sum().backward()
            assert torch.isfinite(loss).all() and torch.isfinite(s_lp.grad).all()
            s_lp.grad = None


# ----------------------------------------------------------------------------------- gradients

def _valid_student(seed, k=4):
    _, _, _, t_lp, s_lp = make_case(seed, n=3, v=12, k=k)
    return t_lp, s_lp.clone().requires_grad_()


@pytest.mark.parametrize("handling", ["tail", "renormalize"])
def test_gradcheck_kd_losses_wrt_student(handling):
    t_lp, s_lp = _valid_student(4)
    assert torch.autograd.gradcheck(lambda s: forward_kl(s, t_lp, handling), (s_lp,))
    assert torch.autograd.gradcheck(lambda s: reverse_kl(s, t_lp, handling), (s_lp,))
    assert torch.autograd.gradcheck(lambda s: generalized_jsd(s, t_lp, handling, 0.4), (s_lp,))
    logits = torch.randn(3, 4, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: mse_topk(s, t_lp), (logits,))


def test_gradcheck_tail_logprob():
    _, s_lp = _valid_student(5)
    assert torch.autograd.gradcheck(tail_logprob, (s_lp,))


def test_tail_logprob_stable_when_kept_mass_reaches_one():
    exact = F.log_softmax(torch.randn(3, 5, dtype=torch.float32), -1).requires_grad_()
    near = torch.log(torch.tensor([[0.5, 0.5 - 1e-12]], dtype=DT)).requires_grad_()
    for lp in (exact, near):
        tail = tail_logprob(lp)
        assert torch.isfinite(tail).all()
        tail.sum().backward()
        assert torch.isfinite(lp.grad).all()
    # float32 sums to 1 only up to its epsilon: the tail of a full log-softmax is at most ~1e-7.
    assert tail_logprob(exact).exp().max() < 1e-6
    dyadic = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.26]]))  # mass exactly 1, and over 1
    torch.testing.assert_close(tail_logprob(dyadic), torch.full((2,), math.log(torch.finfo(torch.float32).tiny)))
    torch.testing.assert_close(tail_logprob(near), torch.tensor([math.log(1e-12)], dtype=DT), rtol=1e-4, atol=0)
    # Student with kept mass 1 and a teacher with a real tail: finite loss, finite gradient.
    t_lp = torch.log(torch.full((3, 5), 0.15))
    for fn in (forward_kl, reverse_kl, generalized_jsd):
        exact.grad = None
        loss = fn(exact, t_lp, "tail")
        loss.sum().backward()
        assert torch.isfinite(loss).all() and torch.isfinite(exact.grad).all()
    # Reverse KL charges the student's tail against an empty teacher tail: large but finite.
    assert reverse_kl(torch.log(torch.tensor([[0.5, 0.3]])), torch.log(torch.tensor([[0.5, 0.5]])),
                      "tail").item() > 1.0


# ----------------------------------------------------------------------------------- student gather

def _dense_gather(hidden, head, ids, labels, temperature, softcap=None):
    logits = head(hidden)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return (F.log_softmax(logits / temperature, -1).gather(-1, ids),
            F.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(-1), logits.gather(-1, ids))


@pytest.mark.parametrize("temperature,softcap", [(1.0, None), (2.0, None), (1.5, 3.0)])
def test_chunked_gather_matches_dense_values_and_gradients(temperature, softcap):
    torch.manual_seed(0)
    n, h, v, k = 7, 5, 23, 4
    head = nn.Linear(h, v, bias=True).to(DT)
    hidden = torch.randn(n, h, dtype=DT, requires_grad=True)
    ids = torch.randint(0, v, (n, k))
    labels = torch.randint(0, v, (n,))
    coef = [torch.randn(n, k, dtype=DT), torch.randn(n, dtype=DT), torch.randn(n, k, dtype=DT)]

    def grads(outputs):
        loss = sum((c * o).sum() for c, o in zip(coef, outputs))
        return torch.autograd.grad(loss, (hidden, head.weight, head.bias))

    want = _dense_gather(hidden, head, ids, labels, temperature, softcap)
    want_grads = grads(want)
    for chunk in (1, 3, n):
        got = student_logprobs_at(hidden, head, ids, labels, temperature=temperature, chunk_size=chunk,
                                  logit_softcap=softcap)
        assert got.temperature == temperature
        outs = (got.topk_logprobs, got.label_logprobs, got.topk_logits)
        for g, w in zip(outs, want):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)
        for g, w in zip(grads(outs), want_grads):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


def test_gather_saves_no_vocabulary_sized_tensor_for_backward():
    head = nn.Linear(8, 1000)
    hidden = torch.randn(64, 8, requires_grad=True)
    ids, labels = torch.randint(0, 1000, (64, 4)), torch.randint(0, 1000, (64,))
    saved: list[tuple[int, ...]] = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        student_logprobs_at(hidden, head, ids, labels, chunk_size=16, temperature=2.0)
        assert saved and all(1000 not in shape for shape in saved)
        head(hidden).log_softmax(-1)  # the probe does see [N, V] when it is kept
    assert (64, 1000) in saved


def test_gather_accepts_a_callable_head_and_upcasts_bf16():
    torch.manual_seed(1)
    weight = torch.randn(11, 4, requires_grad=True)
    hidden = torch.randn(5, 4)
    ids, labels = torch.randint(0, 11, (5, 3)), torch.randint(0, 11, (5,))
    got = student_logprobs_at(hidden.bfloat16(), lambda x: x @ weight.bfloat16().T, ids, labels, chunk_size=2)
    assert got.topk_logprobs.dtype == torch.float32
    got.label_logprobs.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    with torch.no_grad():
        plain = student_logprobs_at(hidden, lambda x: x @ weight.T, ids, labels)
    torch.testing.assert_close(got.topk_logprobs, plain.topk_logprobs, rtol=0, atol=0.1)
    empty = student_logprobs_at(hidden[:0], lambda x: x @ weight.T, ids[:0], labels[:0])
    assert empty.topk_logprobs.shape == (0, 3) and empty.label_logprobs.shape == (0,)


def test_gather_rejects_bad_shapes():
    head = nn.Linear(4, 9)
    with pytest.raises(ValueError, match="topk_ids"):
        student_logprobs_at(torch.randn(3, 4), head, torch.zeros(2, 2, dtype=torch.long),
                            torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden"):
        student_logprobs_at(torch.randn(2, 3, 4), head, torch.zeros(2, 2, dtype=torch.long),
                            torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------------- temperature

@pytest.mark.parametrize("handling", ["tail", "renormalize"])
def test_tempering_at_one_is_identity(handling):
    _, _, _, t_lp, _ = make_case(6, k=5)
    lp, tail = temper_teacher(t_lp, 1.0, handling)
    assert torch.equal(lp, t_lp)
    if handling == "tail":
        torch.testing.assert_close(tail, torch.log(1 - t_lp.exp().sum(-1)), rtol=0, atol=1e-12)
    else:
        assert tail is None


def log_normalizer(t_logits, tau):
    """[N, V] teacher logits -> [N] log Σ_V p^(1/τ) of the τ=1 softmax: what stage one stores per τ."""
    return torch.logsumexp(F.log_softmax(t_logits, -1) / tau, dim=-1)


@pytest.mark.parametrize("tau", [0.5, 2.0, 5.0])
def test_tempering_the_tail_with_the_log_normalizer_is_exact(tau):
    t_logits, _, ids, t_lp, _ = make_case(7, k=5)
    lp, tail = temper_teacher(t_lp, tau, "tail", log_normalizer(t_logits, tau))
    dense = F.log_softmax(t_logits / tau, -1)  # [N, V] the tempered full distribution
    torch.testing.assert_close(lp, dense.gather(-1, ids), rtol=0, atol=1e-12)
    torch.testing.assert_close(tail.exp(), 1 - dense.gather(-1, ids).exp().sum(-1), rtol=0, atol=1e-12)
    # Renormalize: exact restriction of the tempered full distribution to S, with no normalizer needed.
    lp_r, _ = temper_teacher(t_lp, tau, "renormalize")
    full_t = dense.gather(-1, ids)
    torch.testing.assert_close(lp_r, full_t - full_t.logsumexp(-1, keepdim=True), rtol=0, atol=1e-12)


def test_tempering_the_tail_without_a_normalizer_is_refused():
    _, _, _, t_lp, _ = make_case(7, k=5)
    with pytest.raises(ValueError, match="log-normalizer"):
        temper_teacher(t_lp, 2.0, "tail")
    with pytest.raises(ValueError, match=r"\[N=6\]"):
        temper_teacher(t_lp, 2.0, "tail", torch.zeros(5, dtype=DT))


@pytest.mark.parametrize("tau", [0.5, 2.0, 5.0])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_tempered_tail_loss_is_a_lower_bound_and_exact_when_k_equals_v(kind, tau):
    """At K < V the K+1-bucket loss at τ is ≤ the full-vocabulary tempered loss (data processing inequality);
    at K = V it equals it. Before the cache stored normalizers the tail loss exceeded the full one."""
    for k, exact in ((5, False), (None, True)):
        t_logits, s_logits, ids, t_lp, _ = make_case(11, k=k)
        gather = student_logprobs_at(torch.eye(6, dtype=DT), lambda x: x @ s_logits, ids, ids[:, 0],
                                     temperature=tau)
        parts = distillation_loss(gather, t_lp, kind=kind, handling="tail", beta=0.5, temperature=tau,
                                  temperature_squared=False, teacher_log_normalizer=log_normalizer(t_logits, tau))
        per_position_full = dense_reference(kind, t_logits / tau, s_logits / tau)
        if exact:
            torch.testing.assert_close(parts.kd, per_position_full.mean(), rtol=0, atol=1e-10)
        else:
            assert parts.kd <= per_position_full.mean() + 1e-12
            assert parts.kd > 0


def test_tempered_tail_lower_bound_at_bitdistill_settings():
    """K=64, V=32000, τ=5 (configs/bitdistill.yaml): the old single-token tail tempering was 45–92× the true KL;
    with the normalizer the tail bucket holds the teacher's true tempered tail and the loss is a lower bound."""
    g = torch.Generator().manual_seed(3)
    t_logits = torch.randn(4, 32000, generator=g, dtype=DT) * 4
    s_logits = torch.randn(4, 32000, generator=g, dtype=DT) * 4
    t_lp, ids = F.log_softmax(t_logits, -1).topk(64, dim=-1)
    tau = 5.0
    lp, tail = temper_teacher(t_lp, tau, "tail", log_normalizer(t_logits, tau))
    true_tail = 1 - F.softmax(t_logits / tau, -1).gather(-1, ids).sum(-1)
    assert true_tail.min() > 0.9  # most of the tempered mass is outside the top-64
    torch.testing.assert_close(tail.exp(), true_tail, rtol=0, atol=1e-10)
    s_lp = F.log_softmax(s_logits / tau, -1).gather(-1, ids)
    sparse = forward_kl(s_lp, lp, "tail", teacher_tail=tail)
    full = dense_forward_kl(t_logits / tau, s_logits / tau)
    assert torch.all(sparse <= full + 1e-12)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_temperature_squared_and_full_vocab_tempered_kl(kind):
    tau = 2.5
    t_logits, s_logits, ids, t_lp, _ = make_case(8)
    hidden = torch.eye(6, dtype=DT)
    gather = student_logprobs_at(hidden, lambda x: x @ s_logits, ids, ids[:, 0], temperature=tau)
    common = dict(kind=kind, handling="tail", beta=0.5, temperature=tau, kd_weight=1.0, ce_weight=0.0,
                  teacher_log_normalizer=log_normalizer(t_logits, tau))
    plain = distillation_loss(gather, t_lp, temperature_squared=False, **common)
    squared = distillation_loss(gather, t_lp, temperature_squared=True, **common)
    want = dense_reference(kind, t_logits / tau, s_logits / tau).mean()
    torch.testing.assert_close(plain.kd, want, rtol=0, atol=1e-10)
    torch.testing.assert_close(squared.kd, want * tau ** 2, rtol=0, atol=1e-10)
    torch.testing.assert_close(squared.total, want * tau ** 2, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(gather, t_lp, temperature_squared=True, **{**common, "temperature": 1.0})


# ----------------------------------------------------------------------------------- distillation_loss

def _gather_case(seed, k=5):
    t_logits, s_logits, ids, t_lp, s_lp = make_case(seed, k=k)
    labels = torch.arange(6) % 40
    label_lp = F.log_softmax(s_logits, -1).gather(-1, labels[:, None]).squeeze(-1)
    return StudentGather(s_lp, label_lp, s_logits.gather(-1, ids)), t_lp


def test_kd_weight_zero_is_exactly_the_ce_and_never_touches_the_teacher():
    gather, t_lp = _gather_case(9)
    nan_teacher = torch.full_like(t_lp, float("nan"))
    parts = distillation_loss(gather, nan_teacher, kind="forward_kl", kd_weight=0.0, ce_weight=1.0)
    assert parts.kd is None
    assert torch.equal(parts.total, -gather.label_logprobs.mean())
    assert torch.equal(parts.ce, parts.total)
    kd_only = distillation_loss(gather, t_lp, kind="reverse_kl", kd_weight=1.0, ce_weight=0.0)
    assert kd_only.ce is None
    torch.testing.assert_close(kd_only.total, reverse_kl(gather.topk_logprobs, t_lp, "tail").mean())


@pytest.mark.parametrize("kind", KINDS)
def test_weighted_average_equals_manual_weighted_mean(kind):
    gather, t_lp = _gather_case(10)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5, 3.0, 1.0], dtype=DT)
    parts = distillation_loss(gather, t_lp, kind=kind, handling="renormalize", beta=0.3, temperature=1.0,
                              temperature_squared=True, kd_weight=0.7, ce_weight=0.4, weights=w)
    per_kd = sparse_loss(kind, gather.topk_logprobs, gather.topk_logits, t_lp, "renormalize", beta=0.3)
    kd = (w * per_kd).sum() / w.sum()
    ce = (w * -gather.label_logprobs).sum() / w.sum()
    torch.testing.assert_close(parts.kd, kd, rtol=0, atol=1e-12)
    torch.testing.assert_close(parts.ce, ce, rtol=0, atol=1e-12)
    torch.testing.assert_close(parts.total, 0.7 * kd + 0.4 * ce, rtol=0, atol=1e-12)
    assert not torch.allclose(parts.kd, per_kd.mean())  # the weights matter in this case


def test_distillation_loss_rejects_bad_arguments():
    gather, t_lp = _gather_case(11)
    with pytest.raises(ValueError, match="kind"):
        distillation_loss(gather, t_lp, kind="kl")
    with pytest.raises(ValueError, match="handling"):
        distillation_loss(gather, t_lp, handling="drop")
    with pytest.raises(ValueError, match="both 0"):
        distillation_loss(gather, t_lp, kd_weight=0.0, ce_weight=0.0)
    with pytest.raises(ValueError, match="shape"):
        distillation_loss(gather, t_lp[:, :3])
    with pytest.raises(ValueError, match="mse_topk"):
        distillation_loss(gather, t_lp, kind="mse_topk", temperature=2.0)
    with pytest.raises(ValueError, match="weights"):
        distillation_loss(gather, t_lp, weights=torch.ones(5, dtype=DT))
