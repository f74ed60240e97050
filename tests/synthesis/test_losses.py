"""Loss terms: each has the sign and the gradient direction its method relies on."""

from __future__ import annotations

import math

import torch
from torch import nn

from dfkd_common.models.hooks import BNStats
from dfkd_common.synthesis.losses import TERMS, Context, kd_loss, kl_div, weighted_sum


def bn_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    bns = [m for m in net if isinstance(m, nn.BatchNorm2d)]
    bns[0].running_mean.fill_(0.3)
    bns[0].running_var.fill_(2.0)
    return net.eval()


def test_bn_term_is_zero_at_running_stats_and_descends_toward_them() -> None:
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
    bn.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    stats = BNStats(bn)
    x = torch.randn(64, 3, 8, 8)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), unbiased=False, keepdim=True)
    x = x * bn.running_var.sqrt().view(1, 3, 1, 1) + bn.running_mean.view(1, 3, 1, 1)
    bn(x)
    assert float(stats.loss()) < 1e-4
    # far from the statistics: positive, and a gradient step on the input lowers it
    x = torch.rand(64, 3, 8, 8, requires_grad=True)
    bn(x)
    before = stats.loss()
    assert float(before.detach()) > 1.0
    (g,) = torch.autograd.grad(before, x)
    bn(x.detach() - 0.5 * g / g.norm())
    assert float(stats.loss()) < float(before.detach())


def test_bn_term_sums_l2_norms_over_layers() -> None:
    net = bn_net()
    stats = BNStats(net)
    x = torch.rand(8, 1, 10, 10)
    net(x)
    manual = 0.0
    h = x
    for m in net:
        if isinstance(m, nn.BatchNorm2d):
            mean = h.mean((0, 2, 3))
            var = h.var((0, 2, 3), unbiased=False)
            manual += float(((mean - m.running_mean).norm() + (var - m.running_var).norm()).detach())
        h = m(h)
    assert math.isclose(float(stats.loss().detach()), manual, rel_tol=1e-4)


def test_bn_term_weights_the_first_layer_as_deepinversion_does_on_imagenet() -> None:
    net = bn_net()
    stats = BNStats(net)
    net(torch.rand(8, 1, 10, 10))
    first, second = (float(h.loss.detach()) for h in stats.hooks)
    assert first > 0 and second > 0
    assert math.isclose(float(stats.loss(10.0).detach()), 10 * first + second, rel_tol=1e-5)
    ctx = Context(x=torch.zeros(1), y=None, t_logits=torch.zeros(1, 2), bn=stats)
    opts = TERMS.get("bn").options({"first": 10.0})
    assert math.isclose(float(TERMS.get("bn").fn(ctx, opts).detach()), 10 * first + second, rel_tol=1e-5)


def test_bn_momentum_blends_batch_with_ema() -> None:
    bn = nn.BatchNorm2d(2).eval()
    stats = BNStats(bn, momentum=0.9)
    bn(torch.full((4, 2, 3, 3), 5.0))
    stats.update_ema()
    bn(torch.zeros(4, 2, 3, 3))
    # blended mean = 0.1*0 + 0.9*5 = 4.5 per channel; var 0 -> distance to running var 1 per channel
    assert math.isclose(float(stats.loss()), math.sqrt(2 * 4.5**2) + math.sqrt(2), rel_tol=1e-5)
    stats.enable(False)
    bn(torch.zeros(4, 2, 3, 3))
    assert len([h for h in stats.hooks if h.loss is not None]) == 0


def ctx_for(t_logits: torch.Tensor, **kw) -> Context:
    return Context(x=torch.zeros(t_logits.shape[0], 1, 4, 4), t_logits=t_logits, **kw)


def test_onehot_term_falls_as_target_logit_rises() -> None:
    logits = torch.zeros(4, 10, requires_grad=True)
    y = torch.tensor([1, 2, 3, 4])
    loss = TERMS.get("oh")(ctx_for(logits, y=y))
    (g,) = torch.autograd.grad(loss, logits)
    assert math.isclose(float(loss), math.log(10), rel_tol=1e-5)
    assert (g[torch.arange(4), y] < 0).all()  # descending raises the target logit


def test_entropy_balance_is_minimal_for_balanced_batches() -> None:
    ie = TERMS.get("ie")
    balanced = torch.eye(10) * 20
    collapsed = torch.zeros(10, 10)
    collapsed[:, 3] = 20
    assert float(ie(ctx_for(balanced))) < float(ie(ctx_for(collapsed)))
    assert math.isclose(float(ie(ctx_for(balanced))), -math.log(10), rel_tol=1e-3)


def test_activation_term_rewards_large_features() -> None:
    act = TERMS.get("act")
    small, large = torch.full((2, 5), 0.1), torch.full((2, 5), 3.0)
    assert float(act(ctx_for(torch.zeros(2, 10), t_feat=large))) < float(act(ctx_for(torch.zeros(2, 10), t_feat=small)))


def test_adversarial_term_gradient_increases_discrepancy() -> None:
    torch.manual_seed(0)
    teacher, student = nn.Linear(6, 4), nn.Linear(6, 4)
    with torch.no_grad():
        student.weight.copy_(teacher.weight + 0.05 * torch.randn_like(teacher.weight))
        student.bias.copy_(teacher.bias)
    x = torch.randn(32, 6, requires_grad=True)
    t, s = teacher(x), student(x)
    loss = TERMS.get("adv")(Context(x=x, t_logits=t, s_logits=s))
    assert float(loss) <= 0  # minimising -KL
    (g,) = torch.autograd.grad(loss, x)
    x2 = x.detach() - 0.1 * g
    kl_before = kl_div(teacher(x), student(x))
    kl_after = kl_div(teacher(x2), student(x2))
    assert float(kl_after) > float(kl_before)


def test_adversarial_term_ignores_disagreements_and_supports_both_kl_orders() -> None:
    t = torch.tensor([[5.0, 0.0], [5.0, 0.0]])
    s = torch.tensor([[1.0, 0.0], [0.0, 5.0]])  # second sample: argmax disagrees -> masked
    ts = TERMS.get("adv")(Context(x=torch.zeros(2), t_logits=t, s_logits=s))
    st = TERMS.get("adv")(Context(x=torch.zeros(2), t_logits=t, s_logits=s), {"kl_order": "student_teacher"})
    assert math.isclose(float(ts), -float(kl_div(t[:1], s[:1])) / 2, rel_tol=1e-5)
    assert math.isclose(float(st), -float(kl_div(s[:1], t[:1])) / 2, rel_tol=1e-5)
    assert not math.isclose(float(ts), float(st))


def test_kd_loss_is_zero_for_identical_logits_and_pulls_student_to_teacher() -> None:
    t = torch.randn(8, 10)
    assert float(kd_loss(t.clone(), t, 4.0)) < 1e-6
    s = torch.zeros(8, 10, requires_grad=True)
    loss = kd_loss(s, t, 4.0)
    (g,) = torch.autograd.grad(loss, s)
    assert float(kd_loss(s.detach() - 1.0 * g, t, 4.0)) < float(loss)


def test_tv_prefers_smooth_images() -> None:
    tv = TERMS.get("tv")
    smooth = torch.linspace(0, 1, 16).repeat(1, 1, 16, 1)
    noisy = torch.rand(1, 1, 16, 16)
    z = torch.zeros(1, 10)
    assert float(tv(Context(x=smooth, t_logits=z))) < float(tv(Context(x=noisy, t_logits=z)))


def test_weighted_sum_skips_zero_weights() -> None:
    ctx = ctx_for(torch.randn(4, 10))
    total, logs = weighted_sum({"oh": 2.0, "ie": 0.0, "act": 0}, ctx)
    assert set(logs) == {"oh"}
    assert math.isclose(float(total), 2 * logs["oh"], rel_tol=1e-6)
