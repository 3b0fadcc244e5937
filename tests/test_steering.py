"""The paper's equations, checked against autograd and explicit float64 references."""

import math

import pytest
import torch

from svd_lightning.calibration.solvers import ChoiceStrengthCache, ExactStrengthCache, strength_grid
from svd_lightning.config import SteeringConfig
from svd_lightning.steering import (
    PairedLabels,
    StrengthStats,
    contrastive_log_probs,
    contrastive_logits,
    kl_divergence,
    log_probs,
    steer,
    steered_log_probs,
    steering_direction,
    steering_vector,
    strength_terms,
    token_strengths,
)

V = 17


def _logits(*shape, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, V, generator=g, dtype=torch.float64) * scale


def _kl(zw, zb):
    lw, lb = torch.log_softmax(zw, -1), torch.log_softmax(zb, -1)
    return (lw.exp() * (lw - lb)).sum(-1)


def test_delta_is_negative_kl_gradient_and_jacobian_product():
    zw, zb = _logits(4, 3), _logits(4, 3, seed=1)
    delta, _ = steering_vector(zw, zb, alpha=0.1)
    assert delta.dtype == torch.float64

    z = zw.clone().requires_grad_(True)
    _kl(z, zb).sum().backward()
    torch.testing.assert_close(delta, -z.grad, rtol=1e-10, atol=1e-14)

    # δz = J·g with g = −(r + 1), J = diag(p) − p pᵀ built explicitly.
    p = torch.softmax(zw, -1)
    r = torch.log_softmax(zw, -1) - torch.log_softmax(zb, -1)
    J = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    explicit = (J @ (-(r + 1)).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(delta, explicit, rtol=1e-10, atol=1e-14)


def test_fp32_inputs_compute_in_fp32_and_match_fp64():
    zw, zb = _logits(8), _logits(8, seed=1)
    d32, k32 = steering_vector(zw.float(), zb.float())
    d64, k64 = steering_vector(zw, zb)
    assert d32.dtype == torch.float32
    torch.testing.assert_close(d32.double(), d64, rtol=1e-4, atol=1e-6)
    assert torch.equal(k32, k64)


def test_theorem2_directional_derivative():
    zw, zb = _logits(5), _logits(5, seed=1)
    q = torch.softmax(_logits(5, seed=2), -1)
    delta, _ = steering_vector(zw, zb)

    mu = torch.zeros(5, 1, dtype=torch.float64, requires_grad=True)
    K = -(q * torch.log_softmax(zw + mu * delta, -1)).sum()  # KL(q‖·) up to a constant in μ
    (dK,) = torch.autograd.grad(K, mu)

    z = zw.clone().requires_grad_(True)
    (-(q * torch.log_softmax(z, -1)).sum()).backward()
    torch.testing.assert_close(dK.squeeze(-1), (z.grad * delta).sum(-1), rtol=1e-10, atol=1e-14)


def test_confidence_mask_and_alpha_validation():
    z = torch.log(torch.tensor([[0.5, 0.05, 0.049, 0.401]], dtype=torch.float64))
    _, keep = steering_vector(z, torch.zeros_like(z), alpha=0.1)
    assert keep.tolist() == [[True, True, False, True]]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            steering_vector(z, z, alpha=bad)


def test_token_strengths_minimise_their_quadratic_model():
    zw, zb = _logits(6), _logits(6, seed=1)
    delta, keep = steering_vector(zw, zb, alpha=0.05)
    labels = torch.tensor([0, 3, 5, 16, 2, 7])
    mu = token_strengths(zw, delta, keep, labels, "identity")
    p = torch.softmax(zw, -1)
    d = delta.masked_fill(~keep, 0.0)
    e = torch.nn.functional.one_hot(labels, V).double()
    grid = torch.linspace(-200, 200, 400001, dtype=torch.float64)
    for i in range(6):
        # The paper's surrogate: ½‖e_y − p − μ δ̂‖² (identity curvature).
        q = 0.5 * ((e[i] - p[i]).unsqueeze(0) - grid.unsqueeze(1) * d[i].unsqueeze(0)).pow(2).sum(-1)
        assert abs(grid[q.argmin()] - mu[i]) < 2e-3 * max(1.0, abs(mu[i].item()))


def test_fisher_strength_is_exact_newton_step():
    zw, zb = _logits(6), _logits(6, seed=1)
    delta, keep = steering_vector(zw, zb, alpha=0.05)
    labels = torch.tensor([0, 3, 5, 16, 2, 7])
    mu = token_strengths(zw, delta, keep, labels, "fisher")
    d = delta.masked_fill(~keep, 0.0)
    for i in range(6):
        m = torch.zeros((), dtype=torch.float64, requires_grad=True)
        nll = -torch.log_softmax(zw[i] + m * d[i], -1)[labels[i]]
        (g,) = torch.autograd.grad(nll, m, create_graph=True)
        (h,) = torch.autograd.grad(g, m)
        torch.testing.assert_close(mu[i], -g.detach() / h, rtol=1e-6, atol=1e-10)


def test_ignored_and_degenerate_positions_are_nan():
    zw = _logits(3)
    zb = zw.clone()
    zb[1] = _logits(seed=5)  # only position 1 has a non-zero steering vector
    delta, keep = steering_vector(zw, zb)
    mu = token_strengths(zw, delta, keep, torch.tensor([1, -100, 2]))
    assert torch.isnan(mu).all()  # 0: δ = 0; 1: ignored; 2: δ = 0
    mu = token_strengths(zw, delta, keep, torch.tensor([1, 4, 2]))
    assert torch.isnan(mu[0]) and torch.isfinite(mu[1]) and torch.isnan(mu[2])


def test_extreme_inputs_stay_finite_where_kept():
    zw = torch.tensor([[2.0, 1.0, 0.5, -1.0], [1e4, 1e4, -1e4, 0.0], [3.0, 3.0, 3.0, 3.0]])
    zb = torch.tensor([[float("-inf"), 0.0, 0.0, 0.0], [0.0, -1e4, 1e4, 0.0], [1.0, 2.0, 3.0, 4.0]])
    zb[1] = torch.tensor([0.0, -1e4, 0.0, 0.0])  # p_θ of a kept token underflows to 0
    delta, keep = steering_vector(zw, zb)
    assert torch.isfinite(delta).all()
    assert keep[2].all()  # ties are all kept
    for mu in (-5.0, 0.0, 5.0):
        out = steer(zw, zb, mu)
        assert torch.isfinite(out[keep]).all()
        assert (out[~keep] == float("-inf")).all()
        assert not torch.isposinf(out).any() and not torch.isnan(out).any()
    labels = torch.tensor([0, 1, 2])
    assert torch.isfinite(token_strengths(zw, delta, keep, labels)[:2]).all()
    assert torch.isfinite(kl_divergence(zw, zb)).all()


def test_steer_mu_zero_is_warm_and_negative_mu_is_safe():
    zw, zb = _logits(4, 5).float(), _logits(4, 5, seed=1).float()
    out0 = steer(zw, zb, 0.0)
    _, keep = steering_vector(zw, zb)
    assert torch.equal(out0[keep], zw[keep])
    assert torch.equal(out0.argmax(-1), zw.argmax(-1))
    out = steer(zw, zb, -3.0)
    assert not torch.isposinf(out).any() and not torch.isnan(out).any()
    assert (out[~keep] == float("-inf")).all()


@pytest.mark.parametrize("policy", ["mask_generation_only", "none", "floor", "mask"])
def test_scoring_policies_reduce_to_warm_at_mu0_alpha_small(policy):
    zw, zb = _logits(3, 2), _logits(3, 2, seed=1)
    lp = steered_log_probs(zw, zb, 0.0, alpha=1e-300, policy=policy)
    torch.testing.assert_close(lp, torch.log_softmax(zw, -1), rtol=0, atol=1e-12)
    lp = steered_log_probs(zw, zb, -2.0, alpha=0.3, policy=policy)
    assert not torch.isnan(lp).any()
    if policy != "mask":
        assert torch.isfinite(lp).all()


def test_floor_policy_values():
    zw = torch.log(torch.tensor([[0.6, 0.3, 0.1 * 0.5, 0.05]], dtype=torch.float64))
    lp = steered_log_probs(zw, torch.zeros_like(zw), 0.0, alpha=0.2, policy="floor", floor=-9.0)
    torch.testing.assert_close(lp[0, :2], torch.log(torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)))
    assert lp[0, 2:].tolist() == [-9.0, -9.0]


def test_contrastive_baseline():
    zw, zb = _logits(2), _logits(2, seed=1)
    torch.testing.assert_close(contrastive_logits(zw, zb, 0.0), zw)
    torch.testing.assert_close(contrastive_logits(zw, zb, 1.0), 2 * zw - zb)


def _calibration_tokens(n=64, seed=0, alpha=0.1):
    zw, zb = _logits(n, scale=2.0, seed=seed), _logits(n, scale=2.0, seed=seed + 100)
    zb = zw + 0.7 * (zb - zw)  # base close to warm, as after a short warm start
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(torch.softmax(1.5 * zw - 0.5 * zb, -1), 1, generator=g).squeeze(-1)
    delta, keep = steering_vector(zw, zb, alpha)
    return zw, zb, delta, keep, labels


@pytest.mark.parametrize("direction", ["kl_gradient", "logit_difference"])
@pytest.mark.parametrize("policy", ["mask_generation_only", "floor", "mask", "none"])
def test_paired_labels_score_every_config_as_steered_log_probs(policy, direction):
    """The one scorer of score_choices, the grid and the calibration grids: its compact masked form
    (kept tokens + the rest's log-sum-exp) and its chunked unmasked form equal the full-vocabulary
    log-softmax of steered_log_probs, in float64, at every μ, α and label (masked ones included)."""
    n = 150  # > one chunk of positions
    zw, zb = _logits(n), _logits(n, seed=1) * 0.5
    y = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(2))
    paired = PairedLabels(zw, zb, y)
    for alpha in (0.05, 0.3, 1.0):
        for mu in (-3.0, 0.0, 0.7):
            config = SteeringConfig(mu=mu, alpha=alpha, scoring_policy=policy, floor=-7.0, direction=direction)
            ref = steered_log_probs(zw, zb, mu, alpha, policy, -7.0, direction=direction).gather(-1, y[:, None]).squeeze(-1)
            got = paired.log_probs(config)
            assert got.dtype == torch.float64
            assert torch.equal(torch.isinf(got), torch.isinf(ref))
            finite = torch.isfinite(ref)
            torch.testing.assert_close(got[finite], ref[finite], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(paired.plain(), torch.log_softmax(zw, -1).gather(-1, y[:, None]).squeeze(-1))
    torch.testing.assert_close(paired.base(), torch.log_softmax(zb, -1).gather(-1, y[:, None]).squeeze(-1))
    with pytest.raises(ValueError, match="no strength"):
        paired.log_probs(SteeringConfig())


def test_strength_stats_aggregates_match_hand_computation_and_merge():
    zw, _, delta, keep, labels = _calibration_tokens()
    labels[::7] = -100
    terms = strength_terms(zw, delta, keep, labels)
    whole = StrengthStats().update(terms)
    # two "ranks" merged = one pass
    half = labels.numel() // 2
    a = StrengthStats().update(strength_terms(zw[:half], delta[:half], keep[:half], labels[:half]))
    b = StrengthStats().update(strength_terms(zw[half:], delta[half:], keep[half:], labels[half:]))
    merged = StrengthStats.from_tensor(torch.cat([a.to_tensor(), b.to_tensor()], dim=1))

    for c in ("identity", "fisher"):
        mu = token_strengths(zw, delta, keep, labels, c)
        mu = mu[~torch.isnan(mu)]
        srt = mu.sort().values
        k = int(0.1 * srt.numel())
        expected = {
            "mean": mu.mean().item(),
            "median": mu.quantile(0.5).item(),
            "trimmed": srt[k : srt.numel() - k].mean().item(),
        }
        den = terms.den_identity if c == "identity" else terms.den_fisher
        expected["pooled"] = (terms.num[terms.valid].sum() / den[terms.valid].sum()).item()
        for how, value in expected.items():
            assert whole.aggregate(how, c) == pytest.approx(value, rel=1e-9)
            assert merged.aggregate(how, c) == pytest.approx(value, rel=1e-9)
    assert whole.count == int((labels != -100).sum())
    summary = whole.summary()
    assert set(summary) >= {"mean_identity", "pooled_fisher", "tokens"}


def test_strength_stats_empty_is_a_clear_error():
    with pytest.raises(ValueError, match="no calibration token"):
        StrengthStats().mean()


@pytest.mark.parametrize("alpha", [0.1, 1e-9])
def test_exact_strength_matches_grid_search(alpha):
    zw, _, delta, keep, labels = _calibration_tokens(alpha=alpha)
    labels[::9] = -100
    cache = ExactStrengthCache()
    half = 30
    cache.update(zw[:half], delta[:half], keep[:half], labels[:half])
    cache.update(zw[half:], delta[half:], keep[half:], labels[half:])
    mu = cache.solve()

    d = delta.masked_fill(~keep, 0.0)
    sel = labels != -100

    def nll(m):
        return -torch.log_softmax(zw[sel] + m * d[sel], -1).gather(-1, labels[sel, None]).sum()

    grid = torch.linspace(mu - 5, mu + 5, 20001, dtype=torch.float64)
    losses = torch.stack([nll(m) for m in grid])
    assert abs(grid[losses.argmin()].item() - mu) < 1e-3
    loss, grad, _ = cache.loss_grad_hess(mu)
    assert loss == pytest.approx(nll(torch.tensor(mu, dtype=torch.float64)).item(), rel=1e-10)
    assert abs(grad) < 1e-6

    # The same solve split across two "ranks" that sum their derivatives.
    r0, r1 = ExactStrengthCache(), ExactStrengthCache()
    r0.update(zw[:half], delta[:half], keep[:half], labels[:half])
    r1.update(zw[half:], delta[half:], keep[half:], labels[half:])
    calls = iter(range(10**6))

    def fake_allreduce(vals):
        next(calls)
        other = torch.tensor(r1.loss_grad_hess(float(fake_allreduce.mu)), dtype=torch.float64)
        return vals + other

    # r1 must be evaluated at the same μ as r0: wrap r0's evaluation to record it.
    orig = r0.loss_grad_hess

    def recording(m):
        fake_allreduce.mu = m
        return orig(m)

    r0.loss_grad_hess = recording
    assert r0.solve(reduce=fake_allreduce) == pytest.approx(mu, abs=1e-8)
    assert math.isfinite(mu)


def test_policy_none_steers_every_token_and_differs_from_the_masked_policies():
    zw, zb = _logits(5, 3).double(), _logits(5, 3, seed=1).double()
    delta, keep = steering_vector(zw, zb, 0.3)
    assert (~keep).any()
    none = steered_log_probs(zw, zb, -2.0, alpha=0.3, policy="none")
    torch.testing.assert_close(none, torch.log_softmax(zw - 2.0 * delta, -1), rtol=0, atol=1e-12)
    masked = steered_log_probs(zw, zb, -2.0, alpha=0.3, policy="mask_generation_only")
    torch.testing.assert_close(masked, torch.log_softmax(zw - 2.0 * delta * keep, -1), rtol=0, atol=1e-12)
    assert not torch.allclose(none, masked)


# --------------------------------------------------------------------------------------------------
# direction="logit_difference"


def test_logit_difference_is_the_log_ratio_and_unknown_directions_are_refused():
    zw, zb = _logits(4, 3), _logits(4, 3, seed=1)
    delta, _ = steering_vector(zw, zb, direction="logit_difference")
    torch.testing.assert_close(delta, torch.log_softmax(zw, -1) - torch.log_softmax(zb, -1), rtol=0, atol=1e-12)
    # z_φ − z_θ up to one constant per position
    shift = (zw - zb) - delta
    torch.testing.assert_close(shift, shift[..., :1].expand_as(shift), rtol=0, atol=1e-12)
    for fn in (lambda: steering_vector(zw, zb, direction="contrastive"), lambda: steering_direction(zw, zb, "up"),
               lambda: steer(zw, zb, 1.0, direction="x"), lambda: steered_log_probs(zw, zb, 1.0, direction="x")):
        with pytest.raises(ValueError, match="kl_gradient.*logit_difference"):
            fn()


@pytest.mark.parametrize("direction", ["kl_gradient", "logit_difference"])
@pytest.mark.parametrize("policy", ["none", "mask_generation_only"])
def test_mu_zero_is_the_warm_model_for_both_directions(direction, policy):
    zw, zb = _logits(3, 2), _logits(3, 2, seed=1)
    lp = steered_log_probs(zw, zb, 0.0, alpha=0.1, policy=policy, direction=direction)
    torch.testing.assert_close(lp, torch.log_softmax(zw, -1), rtol=0, atol=1e-12)
    _, keep = steering_vector(zw, zb, direction=direction)
    assert torch.equal(steer(zw, zb, 0.0, direction=direction)[keep], zw[keep])


@pytest.mark.parametrize("gamma", [-0.5, 0.3, 1.0, 2.5])
def test_unmasked_logit_difference_steering_is_the_contrastive_baseline_at_mu_gamma(gamma):
    """No normalisation: μ = γ exactly; equal up to log_softmax's per-position shift."""
    zw, zb = _logits(5, 3), _logits(5, 3, seed=1)
    ref = torch.log_softmax(contrastive_logits(zw, zb, gamma), -1)
    none = steered_log_probs(zw, zb, gamma, policy="none", direction="logit_difference")
    torch.testing.assert_close(none, ref, rtol=0, atol=1e-10)
    everything_kept = steer(zw, zb, gamma, alpha=1e-300, direction="logit_difference")  # α → 0: no mask
    torch.testing.assert_close(torch.log_softmax(everything_kept, -1), ref, rtol=0, atol=1e-10)
    # The masked policies renormalise over the keep set: the contrastive baseline restricted to it.
    _, keep = steering_vector(zw, zb, 0.2)
    masked = steered_log_probs(zw, zb, gamma, alpha=0.2, policy="mask", direction="logit_difference")
    torch.testing.assert_close(masked, torch.log_softmax(contrastive_logits(zw, zb, gamma).masked_fill(~keep, -math.inf), -1))


@pytest.mark.parametrize("alpha", [0.1, 1e-9])
def test_exact_strength_with_the_logit_difference_matches_grid_search(alpha):
    zw, zb, _, _, labels = _calibration_tokens(alpha=alpha)
    delta, keep = steering_vector(zw, zb, alpha, direction="logit_difference")
    mu = ExactStrengthCache().update(zw, delta, keep, labels).solve()
    d = delta.masked_fill(~keep, 0.0)
    grid = torch.linspace(mu - 2, mu + 2, 4001, dtype=torch.float64)
    losses = torch.stack([-torch.log_softmax(zw + m * d, -1).gather(-1, labels[:, None]).sum() for m in grid])
    assert abs(grid[losses.argmin()].item() - mu) < 2e-3
    assert mu > 0  # labels drawn from the extrapolation past the warm model: along +(z_φ − z_θ)


# --------------------------------------------------------------------------------------------------
# choice_nll: the calibration set's multiple-choice loss


def _choice_example(seed=0, questions=6, alpha=0.1, direction="kl_gradient", policy="mask_generation_only"):
    """Random questions with an mc1-style set (one true) and an mc2-style set (two true), 1-4 tokens a choice."""
    g = torch.Generator().manual_seed(seed)
    rows = []  # (question, set, is_true, tokens)
    for q in range(questions):
        for cset, n_true in ((0, 1), (1, 2)):
            for c in range(3 + (q + cset) % 2):
                rows.append((10 + q, cset, c < n_true, 1 + int(torch.randint(4, (1,), generator=g))))
    M = sum(r[3] for r in rows)
    zw, zb = _logits(M, scale=2.0, seed=seed), _logits(M, scale=2.0, seed=seed + 50)
    zb = zw + 0.6 * (zb - zw)
    row = torch.cat([torch.full((r[3],), i) for i, r in enumerate(rows)])
    meta = {k: torch.tensor([r[j] for r in rows]) for j, k in enumerate(("question_index", "choice_set", "is_true"))}
    # True answers lean past the warm model (away from the base), false ones toward the base: a
    # finite best μ, since the sampled tokens overlap.
    lean = torch.where(meta["is_true"][row].bool(), 0.5, -0.5).unsqueeze(-1).double()
    target = zw + lean * (zw - zb)
    labels = torch.multinomial(torch.softmax(target, -1), 1, generator=g).squeeze(-1)
    delta, keep = steering_vector(zw, zb, SteeringConfig(alpha=alpha, scoring_policy=policy).statistics_alpha,
                                  direction=direction)
    return zw, zb, delta, keep, labels, row, meta


def _brute_choice_loss(zw, zb, labels, row, meta, mus, alpha, policy, direction, floor=-20.0):
    """Σ over choice sets of −log Σ_true softmax(S): one steered_log_probs call per μ of ``mus`` → [K]."""
    mu = torch.as_tensor(mus, dtype=torch.float64).reshape(-1, 1, 1)
    lp = steered_log_probs(zw, zb, mu, alpha, policy, floor, direction=direction)
    lp = lp.gather(-1, labels.expand(mu.shape[0], -1).unsqueeze(-1)).squeeze(-1)
    scores = torch.zeros(mu.shape[0], len(meta["is_true"]), dtype=torch.float64).index_add(1, row, lp)
    total = torch.zeros(mu.shape[0], dtype=torch.float64)
    for q, cset in {(int(a), int(b)) for a, b in zip(meta["question_index"], meta["choice_set"])}:
        sel = (meta["question_index"] == q) & (meta["choice_set"] == cset)
        s, t = scores[:, sel], meta["is_true"][sel].bool()
        if torch.isfinite(s[:, t]).any():
            total += torch.logsumexp(s, -1) - torch.logsumexp(s[:, t], -1)
    return total


def _choice_cache(example, policy="mask_generation_only", split=None, floor=-20.0):
    zw, _, delta, keep, labels, row, meta = example
    cache = ChoiceStrengthCache(policy, floor)
    bounds = [0, split, len(meta["is_true"])] if split else [0, len(meta["is_true"])]
    for lo, hi in zip(bounds, bounds[1:]):  # batches of whole rows, row ids local to the batch
        t = (row >= lo) & (row < hi)
        cache.update(zw[t], delta[t], keep[t], labels[t], row[t] - lo,
                     *(meta[k][lo:hi] for k in ("question_index", "choice_set", "is_true")))
    return cache


# Policy none with the logit difference is left out: the caches drop tokens below NO_MASK_ALPHA·max p_φ,
# exact for δz (∝ p_φ) but an approximation for the logit difference (documented at NO_MASK_ALPHA).
@pytest.mark.parametrize("policy,direction", [(p, d) for d in ("kl_gradient", "logit_difference")
                                              for p in ("mask_generation_only", "floor", "mask", "none")
                                              if (p, d) != ("none", "logit_difference")])
def test_choice_loss_matches_brute_force_scoring(policy, direction):
    ex = _choice_example(alpha=0.3, direction=direction, policy=policy)
    cache = _choice_cache(ex, policy, split=17, floor=-7.0)
    mus = [-30.0, -2.0, -0.1, 0.0, 0.4, 3.0, 25.0]
    got = cache.losses(mus)
    zw, zb, _, _, labels, row, meta = ex
    ref = _brute_choice_loss(zw, zb, labels, row, meta, mus, 0.3, policy, direction, -7.0)
    tol = 1e-6 if policy == "none" else 1e-10  # none: tokens below NO_MASK_ALPHA·max p_φ unsteered
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    assert torch.isfinite(got).all()
    assert cache.usable_groups() == 12 or policy == "mask"


@pytest.mark.parametrize("direction", ["kl_gradient", "logit_difference"])
def test_choice_strength_solve_matches_a_brute_force_grid(direction):
    ex = _choice_example(seed=3, questions=10, direction=direction)
    cache = _choice_cache(ex)
    mu = cache.solve()
    zw, zb, _, _, labels, row, meta = ex
    lo, hi = (-60.0, 60.0) if direction == "kl_gradient" else (-4.0, 12.0)
    grid = torch.linspace(lo, hi, 6001, dtype=torch.float64)
    brute = _brute_choice_loss(zw, zb, labels, row, meta, grid, 0.1, "mask_generation_only", direction)
    best = grid[int(brute.argmin())].item()
    assert cache.losses([mu])[0] <= brute.min() + 1e-9
    assert abs(mu - best) <= 2 * (hi - lo) / 6000 + 1e-6, (mu, best)
    # The true answers extrapolate away from the base model: −δz for the KL gradient, +(z_φ − z_θ) for the other.
    assert (mu < 0) == (direction == "kl_gradient")
    assert cache.losses([mu])[0] < cache.losses([0.0])[0] - 1.0


def test_choice_strength_is_ddp_reducible():
    """Two ranks holding different questions, all-reducing the loss sums, solve as one cache does."""
    ex = _choice_example(seed=1, questions=8)
    whole = _choice_cache(ex)
    first_half = int((ex[6]["question_index"] < 14).sum())  # questions 10..13 | 14..17
    zw, zb, delta, keep, labels, row, meta = ex
    ranks = []
    for lo, hi in ((0, first_half), (first_half, len(meta["is_true"]))):
        t = (row >= lo) & (row < hi)
        c = ChoiceStrengthCache()
        c.update(zw[t], delta[t], keep[t], labels[t], row[t] - lo,
                 *(meta[k][lo:hi] for k in ("question_index", "choice_set", "is_true")))
        ranks.append(c)
    mus = strength_grid()
    torch.testing.assert_close(ranks[0].losses(mus) + ranks[1].losses(mus), whole.losses(mus), rtol=1e-12, atol=1e-10)

    r0, r1 = ranks
    asked = []
    orig = r0.losses
    r0.losses = lambda m: (asked.append(list(m)), orig(m))[1]
    mu = r0.solve(reduce=lambda vals: vals + r1.losses(asked[-1]))
    assert mu == pytest.approx(whole.solve(), abs=1e-9)


def test_choice_strength_widens_a_grid_that_is_too_narrow():
    ex = _choice_example(seed=3, questions=10)
    cache = _choice_cache(ex)
    mu = cache.solve()
    # What the solver guarantees: golden section stops at a bracket of tol·max(1, |c| + |d|) (tol = 1e-8),
    # and near the minimum it cannot tell two μ apart once ½·f''·Δμ² is below the loss's float64 rounding
    # δf (a sum over the choice sets: ≲ 64·eps·|f|). So two solves agree to bracket + sqrt(2·δf / f'').
    f = lambda m: float(cache.losses([m])[0])  # noqa: E731
    h = 1e-2 * max(1.0, abs(mu))
    curvature = (f(mu + h) - 2 * f(mu) + f(mu - h)) / h**2
    rounding = 64 * torch.finfo(torch.float64).eps * max(1.0, abs(f(mu)))
    tolerance = 2 * 1e-8 * max(1.0, 2 * abs(mu)) + math.sqrt(2 * rounding / curvature)
    assert cache.solve(grid=[-1e-3, 0.0, 1e-3]) == pytest.approx(mu, abs=tolerance)


# -- the contrastive baseline's limit γ → ±∞ (closes a γ grid) ------------------------------------------

@pytest.mark.parametrize("sign", [1, -1])
def test_contrastive_limit_terms_are_the_large_gamma_asymptote(sign):
    """log_softmax(z_φ + γr)(y) = |γ|·slope + offset + o(1), against the full fp64 log-softmax."""
    from svd_lightning.steering import contrastive_limit_terms, log_ratio

    gen = torch.Generator().manual_seed(0)
    warm, base = (3 * torch.randn(6, 13, dtype=torch.float64, generator=gen) for _ in range(2))
    labels = torch.randint(0, 13, (6,), generator=gen)
    lp_warm = log_probs(warm)
    slope, offset = contrastive_limit_terms(lp_warm, log_ratio(lp_warm, log_probs(base)), labels, sign)
    assert (slope <= 0).all()
    for gamma in (1e4, 1e6):
        full = contrastive_log_probs(warm, base, sign * gamma).gather(-1, labels[:, None]).squeeze(-1)
        # o(1) = log(1 + Σ e^{−γ·gap}) is below fp64 rounding here (the smallest gap is > 1e-3); the
        # rounding of γ·r (|r| < 40) bounds the difference
        gaps = (sign * log_ratio(lp_warm, log_probs(base))).sort(-1, descending=True).values
        assert (gaps[:, 0] - gaps[:, 1]).min() > 1e-3
        torch.testing.assert_close(full, gamma * slope + offset, rtol=0, atol=gamma * 40 * 4e-16 + 1e-12)


def test_limit_choice_scores_keep_the_top_slope_and_share_exact_ties_by_offset():
    """A label at the top of r at every token has slope exactly 0: such choices tie and share the set's
    mass by softmax(offset), which the fp64 metric at a huge γ reproduces."""
    from svd_lightning.metrics import truthfulqa_per_question
    from svd_lightning.steering import contrastive_limit_terms, limit_choice_scores, log_ratio

    # one question, set 1 (MC2): three one-token choices; tokens 0 and 1 share the top of r, token 2 is lower
    lp_warm = log_probs(torch.tensor([[0.5, -0.3, 1.0, 0.0, 0.0]] * 3, dtype=torch.float64))
    r = torch.tensor([[2.0, 2.0, 1.0, 0.0, -1.0]] * 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    slope, offset = contrastive_limit_terms(lp_warm, r, labels, 1)
    assert slope.tolist() == [0.0, 0.0, -1.0]
    scores = limit_choice_scores(slope, offset, torch.zeros(3, dtype=torch.long))
    assert scores[2] == float("-inf") and torch.isfinite(scores[:2]).all()
    table = {"question_index": torch.zeros(6, dtype=torch.long), "choice_set": torch.tensor([0, 0, 0, 1, 1, 1]),
             "choice_index": torch.tensor([0, 1, 2, 0, 1, 2]), "is_true": torch.tensor([0, 1, 0, 0, 1, 0])}
    limit = truthfulqa_per_question(**table, score=scores.repeat(2))
    gamma = 1e4  # e^{-γ·1} (the lower choice's weight) is 0 in fp64; rounding γ·r costs ~γ·2·2.2e-16 per logit
    at_gamma = torch.log_softmax(lp_warm + gamma * r, -1).gather(-1, labels[:, None]).squeeze(-1)
    finite = truthfulqa_per_question(**table, score=at_gamma.repeat(2))
    # the two tied choices share the mass as e^{z_φ}: p(true) = e^{-0.3} / (e^{0.5} + e^{-0.3})
    assert limit["mc2"].item() == pytest.approx(math.exp(-0.3) / (math.exp(0.5) + math.exp(-0.3)), rel=1e-12)
    assert limit["mc2"].item() == pytest.approx(finite["mc2"].item(), abs=1e-10)
    assert limit["mc1"].item() == finite["mc1"].item() == 0.0  # argmax: the first tied choice (higher z_φ)


def test_contrastive_limit_sign_is_checked():
    from svd_lightning.steering import ContrastiveLimit

    assert ContrastiveLimit(-1).gamma == float("-inf") and ContrastiveLimit().gamma == float("inf")
    with pytest.raises(ValueError, match="sign must be"):
        ContrastiveLimit(0)
