"""The PPO update's own pieces (vrpo_pl.update); the update itself runs in test_system.py and test_faults.py."""

from __future__ import annotations

from vrpo_pl.update import vib_beta


def test_vib_beta_ramps_linearly_then_holds():
    assert vib_beta(1e-4, 0, 7) == 1e-4
    assert [vib_beta(2.0, 4, k) for k in (0, 1, 4, 10)] == [0.0, 0.5, 2.0, 2.0]
