"""Socket-overlay names and the destination policy."""

from __future__ import annotations

import pytest

from relay.core.overlay import DEFAULT_CHANNELS, channel_of, metric_channel, name_problem, refusal


@pytest.mark.parametrize("name", ["migration.sock", "nbd.sock", "a1b2-migration.sock", "x_y-z.0"])
def test_valid_names(name: str) -> None:
    assert name_problem(name) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("a/b", "'/'"),
        ("..", "starts with '.'"),
        (".hidden", "starts with '.'"),
        ("a b", "characters"),
        ("a\x00b", "characters"),
        ("x" * 256, "longer than 255"),
    ],
)
def test_invalid_names(name: str, why: str) -> None:
    problem = name_problem(name)
    assert problem is not None and why in problem


def test_sessions_map_to_their_channel() -> None:
    assert channel_of("hvA_3f9a-migration.sock") == "migration.sock"
    assert channel_of("hv-a.example.org_3f9a-nbd.sock") == "nbd.sock"
    assert channel_of("hvA_3f9a-other.sock") == "hvA_3f9a-other.sock"
    # the unbound form of earlier releases is no session: any peer could name it
    assert channel_of("3f9a-migration.sock") == "3f9a-migration.sock"
    assert metric_channel("hvA_3f9a-nbd.sock") == "nbd" and metric_channel("libvirt.sock") == "libvirt"


def test_policy() -> None:
    assert refusal("migration.sock", DEFAULT_CHANNELS, True, "hvA") is None
    assert refusal("hvA_ab12-nbd.sock", DEFAULT_CHANNELS, True, "hvA") is None
    assert "another relay" in (refusal("hvA_ab12-nbd.sock", DEFAULT_CHANNELS, True, "hvC") or "")
    assert "not allowed" in (refusal("ab12-nbd.sock", DEFAULT_CHANNELS, True, "hvA") or "")
    assert "not allowed" in (refusal("other.sock", DEFAULT_CHANNELS, True, "hvA") or "")
    assert "not allowed" in (refusal("nbd.sock", ("migration.sock",), True, "hvA") or "")
    assert "libvirt is not set" in (refusal("libvirt.sock", DEFAULT_CHANNELS, False, "hvA") or "")
    assert "'/'" in (refusal("../hvC/migration.sock", DEFAULT_CHANNELS, True, "hvA") or "")
