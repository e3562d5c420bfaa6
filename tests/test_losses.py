"""Tests for fnllm.losses: parity with PyTorch / Hugging Face / float64 formulas, stability in
low precision, composition with torch.func and torch.compile, and boundary errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fnllm import losses, testing

# ----------------------------------------------------------------------------- helpers


def _ref_ce64(logits: torch.Tensor, labels: torch.Tensor, ignore: int, eps: float) -> torch.Tensor:
    """Per-position float64 cross-entropy with label smoothing (0 where ignored)."""
    logp = logits.double().log_softmax(-1)
    valid = labels != ignore
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    smooth = -logp.mean(-1)
    loss = (1 - eps) * nll + eps * smooth
    return torch.where(valid, loss, torch.zeros_like(loss))


def _case(seed: int, shape: tuple[int, ...], classes: int, ignore_frac: float, scale: float = 3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, classes, generator=g) * scale
    labels = torch.randint(0, classes, shape, generator=g)
    drop = torch.rand(shape, generator=g) < ignore_frac
    return logits, torch.where(drop, -100, labels)


def _neg_log_sigmoid64(z: torch.Tensor) -> torch.Tensor:
    """-log(sigmoid(z)) = log(1 + exp(-z)), written so that it never overflows."""
    return torch.log1p(torch.exp(-z.abs())) + torch.clamp(-z, min=0)


# ----------------------------------------------------------------------------- cross_entropy


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=testing.shapes(min_dims=1, max_dims=3, max_side=4),
    classes=st.integers(2, 9),
    ignore_frac=st.sampled_from([0.0, 0.3, 0.7]),
    eps=st.sampled_from([0.0, 0.1, 0.5]),
    reduction=st.sampled_from(["mean", "sum", "none"]),
)
def test_cross_entropy_matches_torch(seed, shape, classes, ignore_frac, eps, reduction):
    logits, labels = _case(seed, shape, classes, ignore_frac)
    got = losses.cross_entropy(logits, labels, reduction=reduction, label_smoothing=eps)
    want = F.cross_entropy(
        logits.reshape(-1, classes),
        labels.reshape(-1),
        reduction=reduction,
        label_smoothing=eps,
    )
    if reduction == "none":
        want = want.reshape(shape)
    if reduction == "mean" and bool((labels == -100).all()):
        want = torch.zeros(())  # torch gives NaN; documented: 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    shape=testing.shapes(min_dims=1, max_dims=3, max_side=4),
    classes=st.integers(2, 9),
    eps=st.sampled_from([0.0, 0.2]),
)
def test_cross_entropy_mean_is_float64_formula_over_counted_positions(seed, shape, classes, eps):
    logits, labels = _case(seed, shape, classes, 0.4)
    ref = _ref_ce64(logits, labels, -100, eps)
    count = max(int((labels != -100).sum()), 1)
    got = losses.cross_entropy(logits, labels, label_smoothing=eps)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref.sum() / count, rtol=1e-5, atol=1e-6)


def test_cross_entropy_all_ignored_is_zero_with_zero_grad():
    logits = torch.randn(3, 5, requires_grad=True)
    loss = losses.cross_entropy(logits, torch.full((3,), -100))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert torch.equal(logits.grad, torch.zeros(3, 5))


def test_cross_entropy_custom_ignore_index():
    logits, labels = _case(0, (6,), 4, 0.0)
    labels[2] = 7
    got = losses.cross_entropy(logits, labels, ignore_index=7, reduction="none")
    assert float(got[2]) == 0.0
    want = F.cross_entropy(logits, labels, ignore_index=7, reduction="none")
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_give_the_float32_answer(dtype):
    logits, labels = _case(1, (4, 16), 50, 0.2)
    want = losses.cross_entropy(logits, labels)
    got = losses.cross_entropy(logits.to(dtype), labels)
    assert got.dtype == torch.float32
    # Only the rounding of the inputs differs; the computation is float32 throughout.
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    exact = losses.cross_entropy(logits.to(dtype).float(), labels)
    assert torch.equal(got, exact)


def test_large_half_precision_logits_do_not_overflow():
    logits, labels = _case(2, (3, 8), 11, 0.0, scale=3e4)
    half = logits.clamp(-6e4, 6e4).half()
    got = losses.cross_entropy(half, labels, reduction="none")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(
        got.double(), _ref_ce64(half, labels, -100, 0.0), rtol=1e-6, atol=1e-3
    )
    seq = losses.sequence_logprobs(half, labels)
    assert torch.isfinite(seq).all()


def test_grad_flows_to_low_precision_logits_in_their_dtype():
    logits = torch.randn(2, 3, 7, dtype=torch.bfloat16, requires_grad=True)
    losses.causal_lm(logits, torch.randint(0, 7, (2, 3))).backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


# ----------------------------------------------------------------------------- causal / mlm / cls


def test_causal_lm_matches_hugging_face_loss():
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 9, 13, generator=g)
    tokens = torch.randint(0, 13, (3, 9), generator=g)
    want = loss_utils.ForCausalLMLoss(logits, tokens, vocab_size=13)
    torch.testing.assert_close(losses.causal_lm(logits, tokens), want)


def test_causal_lm_attention_mask_matches_data_causal_targets():
    data_causal = pytest.importorskip("fnllm.data.causal")
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 7, 10, generator=g)
    tokens = torch.randint(0, 10, (3, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5])  # full, right, left pad
    got = losses.causal_lm(logits, tokens, attention_mask=mask)
    targets = data_causal.causal_targets(tokens, mask)
    torch.testing.assert_close(got, losses.cross_entropy(logits, targets))
    per = losses.causal_lm(logits, tokens, attention_mask=mask, reduction="none")
    assert per.shape == (3, 7)
    assert float(per[1, 3:].abs().sum()) == 0.0 and float(per[2, :2].abs().sum()) == 0.0


def test_causal_lm_with_nothing_to_predict_is_zero():
    assert float(losses.causal_lm(torch.randn(2, 1, 5), torch.zeros(2, 1, dtype=torch.long))) == 0


def test_mlm_matches_hugging_face_masked_lm_loss():
    loss_utils = pytest.importorskip("transformers.loss.loss_utils")
    logits, labels = _case(5, (2, 11), 17, 0.85)
    want = loss_utils.ForMaskedLMLoss(logits, labels, vocab_size=17)
    torch.testing.assert_close(losses.mlm(logits, labels), want)


def test_sentence_order_and_classification_are_mean_cross_entropy():
    logits, labels = _case(6, (8,), 2, 0.0)
    torch.testing.assert_close(
        losses.sentence_order(logits, labels), F.cross_entropy(logits, labels)
    )
    logits, labels = _case(7, (8,), 5, 0.0)
    torch.testing.assert_close(
        losses.classification(logits, labels, label_smoothing=0.1),
        F.cross_entropy(logits, labels, label_smoothing=0.1),
    )


# ----------------------------------------------------------------------------- preference losses


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n=st.integers(1, 6),
    margin=st.sampled_from([0.0, 0.5]),
    scale=st.sampled_from([1.0, 50.0, 1e3]),
)
def test_pairwise_reward_is_bradley_terry_nll(seed, n, margin, scale):
    g = torch.Generator().manual_seed(seed)
    rc, rr = torch.randn(n, generator=g) * scale, torch.randn(n, generator=g) * scale
    got = losses.pairwise_reward(rc, rr, margin=margin, reduction="none")
    want = _neg_log_sigmoid64(rc.double() - rr.double() - margin)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses.pairwise_reward(rc, rr, margin=margin), got.mean())


def test_pairwise_reward_gradient_prefers_chosen():
    rc = torch.zeros(3, requires_grad=True)
    rr = torch.zeros(3, requires_grad=True)
    losses.pairwise_reward(rc, rr).backward()
    assert (rc.grad < 0).all() and (rr.grad > 0).all()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    beta=st.sampled_from([0.05, 0.1, 0.5]),
    eps=st.sampled_from([0.0, 0.1, 0.3]),
)
def test_dpo_matches_formula(seed, beta, eps):
    g = torch.Generator().manual_seed(seed)
    pc, pr, rc, rr = (torch.randn(5, generator=g) * 20 - 40 for _ in range(4))
    got = losses.dpo(pc, pr, rc, rr, beta=beta, label_smoothing=eps, reduction="none")
    z = beta * ((pc.double() - rc.double()) - (pr.double() - rr.double()))
    want = (1 - eps) * _neg_log_sigmoid64(z) + eps * _neg_log_sigmoid64(-z)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_dpo_is_log2_when_policy_equals_reference():
    x = torch.randn(4)
    assert math.isclose(float(losses.dpo(x, x + 1, x, x + 1)), math.log(2), rel_tol=1e-6)


# ----------------------------------------------------------------------------- sequence_logprobs


def test_sequence_logprobs_is_loop_of_token_logprobs():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 6, 9, generator=g)
    tokens = torch.randint(0, 9, (2, 6), generator=g)
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]])
    logp = logits.double().log_softmax(-1)
    want, counts = torch.zeros(2, dtype=torch.float64), torch.zeros(2)
    for b in range(2):
        for t in range(1, 6):
            if mask[b, t]:
                want[b] += logp[b, t - 1, tokens[b, t]]
                counts[b] += 1
    got = losses.sequence_logprobs(logits, tokens, mask)
    torch.testing.assert_close(got.double(), want)
    avg = losses.sequence_logprobs(logits, tokens, mask, average=True)
    torch.testing.assert_close(avg.double(), want / counts.double())
    full = losses.sequence_logprobs(logits, tokens)
    torch.testing.assert_close(
        full, losses.sequence_logprobs(logits, tokens, torch.ones_like(mask))
    )


def test_sequence_logprobs_feed_dpo_gradients():
    logits = torch.randn(2, 5, 7, requires_grad=True)
    tokens = torch.randint(0, 7, (2, 5))
    lp = losses.sequence_logprobs(logits, tokens)
    losses.dpo(lp[:1], lp[1:], lp[:1].detach(), lp[1:].detach()).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- transforms


def test_per_example_grads_under_vmap_equal_a_loop():
    g = torch.Generator().manual_seed(9)
    w = torch.randn(6, 11, generator=g)
    x = torch.randn(4, 5, 6, generator=g)
    tokens = torch.randint(0, 11, (4, 5), generator=g)
    mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2, [1] * 5, [1] * 4 + [0]])

    def loss_fn(w, x, t, m):
        return losses.causal_lm(x @ w, t, attention_mask=m)

    got = torch.func.vmap(torch.func.grad(loss_fn), in_dims=(None, 0, 0, 0))(w, x, tokens, mask)
    for i in range(4):
        wi = w.clone().requires_grad_()
        (want,) = torch.autograd.grad(loss_fn(wi, x[i], tokens[i], mask[i]), wi)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


def test_compiled_losses_match_eager_without_graph_breaks():
    g = torch.Generator().manual_seed(10)
    logits = torch.randn(2, 5, 7, generator=g)
    tokens = torch.randint(0, 7, (2, 5), generator=g)
    mask = torch.ones(2, 5, dtype=torch.long)

    def fn(logits, tokens, mask):
        lp = losses.sequence_logprobs(logits, tokens, mask)
        return (
            losses.causal_lm(logits, tokens, attention_mask=mask, label_smoothing=0.1)
            + losses.dpo(lp[:1], lp[1:], lp[:1] - 1, lp[1:])
            + losses.pairwise_reward(lp[:1], lp[1:])
        )

    explain = torch._dynamo.explain(fn)(logits, tokens, mask)
    assert explain.graph_break_count == 0
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(logits, tokens, mask), fn(logits, tokens, mask))


# ----------------------------------------------------------------------------- errors


def test_labels_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"labels: shape \(4, 3\) does not match logits"):
        losses.cross_entropy(torch.randn(4, 5, 7), torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens: shape"):
        losses.causal_lm(torch.randn(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask: shape"):
        losses.sequence_logprobs(
            torch.randn(2, 5, 7),
            torch.zeros(2, 5, dtype=torch.long),
            torch.ones(2, 4, dtype=torch.long),
        )


def test_out_of_range_labels_are_named():
    labels = torch.tensor([[1, 2], [7, 0]])
    with pytest.raises(ValueError, match=r"labels: id 7 at \[1, 0\] >= num_classes 7"):
        losses.cross_entropy(torch.randn(2, 2, 7), labels)
    with pytest.raises(ValueError, match=r"id -3 at \[0\] < 0"):
        losses.mlm(torch.randn(2, 7), torch.tensor([-3, 1]))
    with pytest.raises(ValueError, match=r"tokens: id 9 at \[0, 1\]"):
        losses.causal_lm(torch.randn(1, 2, 7), torch.tensor([[1, 9]]))


def test_bad_dtypes_and_options_raise():
    with pytest.raises(TypeError, match="labels: expected an integer tensor"):
        losses.cross_entropy(torch.randn(3, 4), torch.zeros(3))
    with pytest.raises(TypeError, match="logits: expected a floating-point tensor"):
        losses.cross_entropy(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        losses.cross_entropy(torch.randn(3, 4), torch.zeros(3, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.cross_entropy(
            torch.randn(3, 4), torch.zeros(3, dtype=torch.long), label_smoothing=2.0
        )
    with pytest.raises(ValueError, match=r"expected \[\.\.\., 2\]"):
        losses.sentence_order(torch.randn(3, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="rejected_rewards: shape"):
        losses.pairwise_reward(torch.randn(3), torch.randn(4))
    with pytest.raises(ValueError, match="beta"):
        losses.dpo(*(torch.zeros(2) for _ in range(4)), beta=0.0)
