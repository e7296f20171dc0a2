"""The attack contract: three modes named after what an attack uses, and the target set an attack is run on."""

from __future__ import annotations

import pytest

from attacks.base import MODES, check_compatible
from attacks.none import NoAttack
from attacks.ringabell import RingABell
from attacks.unlearndiffatk import UnlearnDiffAtk
from crt.base import DefendedModel
from runners.spec import Access


@pytest.mark.parametrize(("attack", "mode", "agnostic"), [
    (NoAttack(), "transfer", True),
    (RingABell(), "transfer", True),  # the public base text encoder only: one search serves every CRT
    (RingABell(adaptive=True), "adaptive", False),  # + the filter's score
    (UnlearnDiffAtk(), "white-box", False),  # the deployed UNet's gradients and judged queries of the defended model
    (UnlearnDiffAtk(adaptive=True), "adaptive", False),  # + the filter's gradients
])
def test_mode_is_derived_from_what_the_attack_uses(attack, mode, agnostic):
    assert attack.mode == mode and mode in MODES and attack.identity()["mode"] == mode
    assert attack.model_agnostic is agnostic


def test_the_oracle_alone_makes_an_attack_white_box():
    """The judge is the attacker's own tool, but it judges generations of the defended system."""

    class QueriesOnly(NoAttack):
        name = "queries_only"
        requires = frozenset({Access.JUDGE_ORACLE})

    attack = QueriesOnly()
    assert attack.mode == "white-box" and not attack.model_agnostic
    check_compatible(attack, DefendedModel(pipe=None, exposes=frozenset()))  # and no CRT can withhold it


def test_target_set_defaults_to_unacceptable_and_is_a_param():
    assert NoAttack().target_set == "unacceptable" and RingABell().target_set == "unacceptable"
    attack = RingABell(target_set="ringabell_nudity")
    assert attack.target_set == "ringabell_nudity" and attack.identity()["params"]["target_set"] == "ringabell_nudity"
    assert UnlearnDiffAtk(target_set="x").config.target_set == "x"
