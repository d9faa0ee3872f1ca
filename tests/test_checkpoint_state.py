"""What a checkpoint carries beside the weights: RNG states round-trip, and the fingerprint refuses a mismatch."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from vrpo_pl.checkpoint import check_fingerprint, config_fingerprint, restore_rng_states, rng_states


def test_rng_states_round_trip():
    state = rng_states(torch.device("cpu"))
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # move every generator on
    restore_rng_states(state, torch.device("cpu"))
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]


def test_fingerprint_names_what_differs():
    weights = [("policy.lora_A", torch.zeros(4, 2)), ("critic.head.decoder.weight", torch.zeros(1, 8))]
    saved = config_fingerprint({"algorithm": "vrpo", "vib": True}, weights)
    assert saved["trainable"] == 2 and saved["trainable_numel"] == 16
    check_fingerprint(saved, config_fingerprint({"algorithm": "vrpo", "vib": True}, weights))  # the same: accepted
    other = config_fingerprint({"algorithm": "ppo", "vib": False}, weights[:1])
    with pytest.raises(ValueError, match=r"'run/last.ckpt' comes from an incompatible configuration .*algorithm: "
                                         r"'vrpo' in the checkpoint, 'ppo' now"):
        check_fingerprint(other, saved, "run/last.ckpt")
