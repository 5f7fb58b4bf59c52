"""KL controllers against updates computed by hand, checkpoint round trips, the config factory."""

from __future__ import annotations

import pytest

from actors.core.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    KLController,
    make_kl_controller,
)
from loop.config import KLConfig


def test_adaptive_matches_hand_computed_updates():
    c = AdaptiveKLController(init_value=0.1, target=6.0, horizon=10000)
    # KL 8: 8/6 − 1 = 0.333 → clipped to +0.2; mult = 1 + 0.2·256/10000 = 1.00512.
    c.update(current_kl=8.0, n_steps=256)
    assert c.value == pytest.approx(0.100512, rel=1e-12)
    # KL 3: 3/6 − 1 = −0.5 → clipped to −0.2; mult = 1 − 0.2·256/10000 = 0.99488.
    c.update(current_kl=3.0, n_steps=256)
    assert c.value == pytest.approx(0.09999737856, rel=1e-12)  # 0.100512 · 0.99488
    # KL 6.6: 6.6/6 − 1 = 0.1, inside the clip; mult = 1 + 0.1·256/10000 = 1.00256.
    c.update(current_kl=6.6, n_steps=256)
    assert c.value == pytest.approx(0.1002533718491136, rel=1e-12)  # 0.09999737856 · 1.00256
    # On target, or with no samples, β does not move.
    c.update(current_kl=6.0, n_steps=256)
    c.update(current_kl=100.0, n_steps=0)
    assert c.value == pytest.approx(0.1002533718491136, rel=1e-12)


def test_adaptive_unclipped_error_and_negative_kl():
    c = AdaptiveKLController(init_value=0.2, target=4.0, horizon=1000)
    c.update(current_kl=4.4, n_steps=1000)  # error 0.1, K_β = 1 → ×1.1
    assert c.value == pytest.approx(0.22, rel=1e-12)
    c.update(current_kl=-3.0, n_steps=500)  # a negative k1 estimate: error −1.75 → −0.2, ×0.9
    assert c.value == pytest.approx(0.198, rel=1e-12)


def test_fixed_never_moves():
    c = FixedKLController(0.05)
    for kl in (0.0, 100.0, -5.0):
        c.update(current_kl=kl, n_steps=512)
    assert c.value == 0.05


@pytest.mark.parametrize("make", [lambda: FixedKLController(0.3),
                                  lambda: AdaptiveKLController(0.3, target=6.0, horizon=100)])
def test_state_dict_round_trip(make):
    a = make()
    a.update(current_kl=9.0, n_steps=10)
    b = make()
    b.load_state_dict(a.state_dict())
    assert b.value == a.value
    a.update(current_kl=2.0, n_steps=10)
    b.update(current_kl=2.0, n_steps=10)
    assert b.value == a.value
    with pytest.raises(KeyError, match="'value'"):
        b.load_state_dict({"beta": 1.0})


def test_adaptive_state_survives_a_different_value_in_between():
    a = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    a.update(current_kl=8.0, n_steps=256)
    b = AdaptiveKLController(0.5, target=6.0, horizon=10000)  # a resumed run's fresh start
    b.load_state_dict(a.state_dict())
    assert b.value == pytest.approx(0.100512, rel=1e-12)


def test_factory_follows_the_config():
    fixed = make_kl_controller(KLConfig(controller="fixed", init_coef=0.05))
    assert isinstance(fixed, FixedKLController)
    assert fixed.value == 0.05
    adaptive = make_kl_controller(KLConfig())  # defaults: adaptive, 0.1, target 6, horizon 10000
    assert isinstance(adaptive, AdaptiveKLController)
    assert isinstance(adaptive, KLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 6.0, 10000)
    adaptive.update(current_kl=8.0, n_steps=256)
    assert adaptive.value == pytest.approx(0.100512, rel=1e-12)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="never moves"):
        make_kl_controller(KLConfig(controller="adaptive", init_coef=0.0))
    assert make_kl_controller(KLConfig(controller="fixed", init_coef=0.0)).value == 0.0
    with pytest.raises(ValueError, match="target and horizon"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="n_steps"):
        AdaptiveKLController(0.1, target=1.0, horizon=10).update(current_kl=1.0, n_steps=-1)
    with pytest.raises(ValueError, match=">= 0"):
        FixedKLController(-0.1)
