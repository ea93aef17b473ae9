import math

import pytest
import torch

from sppo_lightning import losses

# One pair: policy chosen/rejected -10/-20, reference -12/-18, so Δw = +2, Δl = -2, h = 4.
PC, PR, RC, RR = (torch.tensor([v], dtype=torch.float64) for v in (-10.0, -20.0, -12.0, -18.0))


def t(*values, dtype=torch.float32, grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=grad)


def test_sppo_hand_value():
    # targets η(p-½) = 100·0.2 = 20 and 100·(-0.2) = -20: ½((2-20)² + (-2+20)²) = 324
    loss = losses.sppo_loss(PC, PR, RC, RR, t(0.7), t(0.3), eta=100.0)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(324.0)


def test_sppo_is_zero_at_its_targets():
    eta, pw, pl = 1000.0, 0.73, 0.21
    rc, rr = t(-31.0, -5.0), t(-40.0, -7.5)
    pc, pr = rc + eta * (pw - 0.5), rr + eta * (pl - 0.5)
    loss = losses.sppo_loss(pc, pr, rc, rr, t(pw, pw), t(pl, pl), eta=eta)
    assert torch.allclose(loss, torch.zeros(2), atol=1e-6)


def test_sppo_gradient_is_residual():
    # ∂L/∂Δw = Δw - η(p_w - ½): the ½ in front of the squares cancels the 2 of the derivative.
    pc = t(-10.0, grad=True)
    pr = t(-20.0, grad=True)
    losses.sppo_loss(pc, pr, t(-12.0), t(-18.0), t(0.7), t(0.3), eta=100.0).sum().backward()
    assert pc.grad.item() == pytest.approx(2.0 - 100.0 * 0.2)
    assert pr.grad.item() == pytest.approx(-2.0 - 100.0 * (0.3 - 0.5))


def test_sppo_single_hand_value_and_symmetry():
    # target 10·(0.8-½) = 3 for chosen, -3 for rejected: ½((2-3)² + (-2+3)²) = 1
    assert losses.sppo_single_loss(PC, PR, RC, RR, t(0.8), eta=10.0).item() == pytest.approx(1.0)
    # swapping the pair and mirroring the probability gives the same loss
    swapped = losses.sppo_single_loss(PR, PC, RR, RC, t(0.2), eta=10.0)
    assert swapped.item() == pytest.approx(1.0)


def test_sppo_single_equals_sppo_with_mirrored_win_rates():
    p = t(0.9, 0.6)
    a = losses.sppo_single_loss(PC, PR, RC, RR, p, eta=50.0)
    b = losses.sppo_loss(PC, PR, RC, RR, p, 1 - p, eta=50.0)
    assert torch.allclose(a, b)


def test_sppo_hard_is_twice_official_with_hard_probs():
    # β = 0.5 → targets ±1: (2-1)² + (-2+1)² = 2
    hard = losses.sppo_hard_loss(PC, PR, RC, RR, beta=0.5)
    assert hard.item() == pytest.approx(2.0)
    official = losses.sppo_loss(PC, PR, RC, RR, t(1.0), t(0.0), eta=2.0)
    assert hard.item() == pytest.approx(2 * official.item())


def test_dpo_hand_values():
    # h = (−10+20) − (−12+18) = 4; β = 0.1 → −logσ(0.4) = log(1 + e^{−0.4})
    plain = losses.dpo_loss(PC, PR, RC, RR, beta=0.1)
    assert plain.item() == pytest.approx(math.log1p(math.exp(-0.4)))
    smoothed = losses.dpo_loss(PC, PR, RC, RR, beta=0.1, label_smoothing=0.1)
    expected = 0.9 * math.log1p(math.exp(-0.4)) + 0.1 * math.log1p(math.exp(0.4))
    assert smoothed.item() == pytest.approx(expected)


def test_ipo_hand_value():
    # (h − 1/(2β))² = (4 − 5)² = 1
    assert losses.ipo_loss(PC, PR, RC, RR, beta=0.1).item() == pytest.approx(1.0)


def _odds(x: float) -> float:
    return x - math.log(-math.expm1(x))


def test_orpo_hand_value():
    lw, ll, lam = -0.5, -2.0, 0.1
    expected = -lw - lam * -math.log1p(math.exp(-(_odds(lw) - _odds(ll))))
    assert losses.orpo_loss(t(lw), t(ll), lam=lam).item() == pytest.approx(expected, rel=1e-6)


def test_asft_hand_value_and_closed_form():
    lw, ll, lam = -0.5, -2.0, 1.0
    # β = 1: the bracket is log P̄w + log(1 − P̄l), so L = −(1+λ)ℓ̄w − λ·log(1 − e^{ℓ̄l})
    closed = -(1 + lam) * lw - lam * math.log(-math.expm1(ll))
    assert losses.asft_loss(t(lw), t(ll), lam=lam).item() == pytest.approx(closed, rel=1e-6)
    beta = 0.5
    tempered = -lw - lam * (
        -math.log1p(math.exp(-beta * _odds(lw))) - math.log1p(math.exp(beta * _odds(ll)))
    )
    assert losses.asft_loss(t(lw), t(ll), lam=lam, beta=beta).item() == pytest.approx(tempered, rel=1e-6)


def test_simpo_hand_value_and_gradient():
    # β = 2, γ = 1, ℓ̄w = -1, ℓ̄l = -2: -logσ(2·1 - 1) = log(1 + e^-1) = 0.31326...
    lw, ll = t(-1.0, grad=True), t(-2.0, grad=True)
    loss = losses.simpo_loss(lw, ll, beta=2.0, gamma=1.0)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    loss.sum().backward()
    # ∂L/∂ℓ̄w = -β·σ(-(β·Δ - γ)) = -2·σ(-1); the rejected side mirrors it
    assert lw.grad.item() == pytest.approx(-2.0 / (1.0 + math.e), rel=1e-6)
    assert ll.grad.item() == pytest.approx(2.0 / (1.0 + math.e), rel=1e-6)
    # at a margin of exactly γ/β the loss is log 2
    assert losses.simpo_loss(t(-1.0), t(-1.5), beta=2.0, gamma=1.0).item() == pytest.approx(math.log(2.0))


@pytest.mark.parametrize("x", [-1e-3, -1e-5, -1e-7 * 100, -0.5, -3.0, -40.0])
def test_log1mexp_accurate_in_float32(x):
    got = losses.log1mexp(t(x)).item()
    assert got == pytest.approx(math.log(-math.expm1(x)), rel=1e-5)


@pytest.mark.parametrize("value", [0.0, -1e-12, -1e-9, 1e-7])
def test_asft_and_orpo_stay_finite_near_zero(value):
    # ℓ̄ → 0 means P̄ → 1: log(1 − P̄) diverges unless clamped; never NaN, gradients finite.
    lw = t(value, -0.2, grad=True)
    ll = t(value, value, grad=True)
    for loss in (losses.asft_loss(lw, ll, lam=1.0), losses.orpo_loss(lw, ll, lam=0.1)):
        assert torch.isfinite(loss).all()
        loss.sum().backward()
        assert torch.isfinite(lw.grad).all() and torch.isfinite(ll.grad).all()
        lw.grad = ll.grad = None


def test_losses_compute_in_float32_from_bf16():
    pc, pr, rc, rr = (x.to(torch.bfloat16) for x in (PC, PR, RC, RR))
    out = losses.dpo_loss(pc, pr, rc, rr, beta=0.1)
    assert out.dtype == torch.float32
    # float64 inputs stay float64 (the official code's targets are float64)
    assert losses.sppo_loss(PC, PR, RC, RR, t(0.7), t(0.3), eta=1.0).dtype == torch.float64


# ------------------------------------------------------------------------------------ BOND
def test_jbond_reward_is_minus_log_16_for_a_double_loss():
    r = losses.jbond_reward(torch.tensor([True, False]))
    assert r.tolist() == pytest.approx([-math.log(16), 0.0])
    # at the median (p≤ = ½) the expected reward equals log p≤: P(lose both) = ¼ → ¼·(−log 16) = log ½
    assert 0.25 * -math.log(16) == pytest.approx(math.log(0.5))


def test_bond_reward_quantile_and_clip():
    wins = torch.tensor([[1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    r = losses.bond_reward(wins, n=8)
    assert r[0].item() == pytest.approx(7 * math.log(0.75))
    assert r[1].item() == pytest.approx(7 * math.log(1 / 8))  # clipped at 1/(2k), k = 4


def test_leave_one_out_baseline():
    assert losses.leave_one_out_baseline(torch.tensor([1.0, 2.0, 6.0])).tolist() == pytest.approx([4.0, 3.5, 1.5])
    assert losses.leave_one_out_baseline(torch.tensor([5.0])).tolist() == [0.0]


def test_bond_loss_hand_value_and_gradients():
    fw = t(-3.0, -5.0, grad=True)
    pol = t(-10.0, -4.0, grad=True)
    anc = t(-11.0, -4.0)
    reward = t(-math.log(16), 0.0)
    loss = losses.bond_loss(fw, pol, anc, reward, beta=0.5)
    # returns R = r − (log π − log π_anchor) = [−log16 − 1, 0]; leave-one-out baselines = [0, −log16 − 1]
    r0 = -math.log(16) - 1.0
    advantage = [r0 - 0.0, 0.0 - r0]
    expected = [0.5 * 3.0 + 0.5 * 10.0 * advantage[0], 0.5 * 5.0 + 0.5 * 4.0 * advantage[1]]
    assert loss.tolist() == pytest.approx(expected, rel=1e-6)
    loss.sum().backward()
    assert fw.grad.tolist() == pytest.approx([-0.5, -0.5])  # forward KL: NLL of the best anchor sample
    assert pol.grad.tolist() == pytest.approx([-0.5 * a for a in advantage], rel=1e-6)  # −β(R−B): R−B detached


def test_best_of_n_kl_formula():
    """KL(π_BoN‖π_ref) = log N − (N−1)/N for continuous rewards (Theorem 1); check it on a fine
    categorical π_ref with distinct rewards, where π_BoN(y) = F(y)^N − F(y⁻)^N."""
    n, atoms = 4, 20_000
    p = torch.full((atoms,), 1.0 / atoms, dtype=torch.float64)
    cdf = p.cumsum(0)
    bon = cdf**n - (cdf - p) ** n
    kl = (bon * (bon / p).log()).sum().item()
    assert kl == pytest.approx(losses.best_of_n_kl(n), abs=1e-3)
    assert losses.best_of_n_kl(1) == 0.0  # one sample is the reference itself
    assert losses.best_of_n_kl(8) == pytest.approx(math.log(8) - 7 / 8)


def test_anchor_kl_surrogate_gradient_is_the_kl_gradient():
    """Hand case: π = softmax(θ) over 3 responses, a fixed anchor; averaged exactly over y ~ π, the
    surrogate's gradient equals autograd's gradient of KL(π‖π_anchor)."""
    theta = torch.tensor([0.3, -1.2, 0.8], dtype=torch.float64, requires_grad=True)
    anchor = torch.log_softmax(torch.tensor([0.0, 0.5, -0.4], dtype=torch.float64), 0)
    logp = torch.log_softmax(theta, 0)
    (exact,) = torch.autograd.grad((logp.exp() * (logp - anchor)).sum(), theta)
    logp = torch.log_softmax(theta, 0)
    surrogate = (logp.exp().detach() * losses.anchor_kl_surrogate(logp, anchor)).sum()
    (estimate,) = torch.autograd.grad(surrogate, theta)
    torch.testing.assert_close(estimate, exact)
    assert exact.abs().sum() > 0
    # its value per sample is the log-ratio times log π; the KL is what to report
    torch.testing.assert_close(losses.anchor_kl_surrogate(t(-2.0), t(-3.0)), t(-2.0))
