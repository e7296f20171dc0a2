"""The attack contract: three modes named after what an attack uses, and the target set an attack is run on."""

from __future__ import annotations

import inspect
import sys

import pytest

from attacks.base import MODES, check_compatible
from attacks.none import NoAttack
from attacks.ringabell import RingABell
from attacks.unlearndiffatk import UnlearnDiffAtk
from crt.base import DefendedModel
from runners.registry import available, build_attack
from runners.spec import Access
from tests.runners.conftest import compose_config


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


def test_queries_alone_make_an_attack_white_box():
    """A black-box attack sends prompts to the deployed system: no CRT can withhold that, but it is searched per CRT."""

    class BlackBox(NoAttack):
        name = "black_box"
        requires = frozenset({Access.SYSTEM_QUERIES})

    attack = BlackBox()
    assert attack.mode == "white-box" and not attack.model_agnostic
    check_compatible(attack, DefendedModel(pipe=None, exposes=frozenset()))


@pytest.mark.parametrize("name", available("attack"))
def test_an_attack_that_queries_the_system_declares_it(name: str):
    """``AttackContext.generate`` is only given with ``SYSTEM_QUERIES``: an attack calling it must declare it."""
    attack = build_attack(compose_config([f"attack={name}"])["attack"], "mini")
    source = inspect.getsource(sys.modules[type(attack).__module__])
    if "ctx.generate(" in source:
        assert Access.SYSTEM_QUERIES in attack.requires, f"{name} queries the system without declaring it"
