"""Admission's bookkeeping: who holds which slot, and who is closed to make room."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter

from relay.admission import Admission, OverLimit
from relay.config import Limits


def admission(**limits: int) -> tuple[Admission, Counter]:
    refused = Counter("refused", "", ["reason"], registry=CollectorRegistry())
    return Admission(Limits(**limits), refused), refused


def test_over_the_per_address_cap_the_newcomer_is_refused() -> None:
    adm, refused = admission(unauthenticated_per_address=2)
    adm.unauthenticated_slot("10.0.0.9")
    adm.unauthenticated_slot("10.0.0.9")
    with pytest.raises(OverLimit) as e:
        adm.unauthenticated_slot("10.0.0.9")
    assert e.value.reason == "unauthenticated_per_address"
    assert refused.labels("unauthenticated_per_address")._value.get() == 1
    adm.unauthenticated_slot("10.0.0.10")  # another address is not affected
    assert adm.unauthenticated == 3


def test_over_the_overall_cap_the_busiest_sources_oldest_makes_room() -> None:
    adm, refused = admission(unauthenticated=4)
    closed: list[str] = []
    for name, address in [("a1", "10.0.0.1"), ("b1", "10.0.0.2"), ("b2", "10.0.0.2"), ("c1", "10.0.0.3")]:
        adm.unauthenticated_slot(address, lambda name=name: closed.append(name))  # type: ignore[misc]
    adm.unauthenticated_slot("10.0.0.4", lambda: closed.append("peer"))
    assert closed == ["b1"] and adm.unauthenticated == 4
    # now every address holds one: the one that has held slots longest goes first
    adm.unauthenticated_slot("10.0.0.5", lambda: closed.append("d1"))
    assert closed == ["b1", "a1"]
    assert refused.labels("unauthenticated")._value.get() == 2


def test_a_slot_is_released_once_even_if_evicted_first() -> None:
    adm, _ = admission(handshakes=1)
    first = adm.handshake_slot("10.0.0.1", lambda: None)
    adm.handshake_slot("10.0.0.2", lambda: None)  # evicts the first
    assert adm.handshakes == 1
    first.release()  # its task ends later and releases: no double count
    first.release()
    assert adm.handshakes == 1


def test_without_anything_to_evict_the_newcomer_is_refused() -> None:
    adm, _ = admission(handshakes=1)
    adm.handshake_slot("10.0.0.1")  # holds a slot but cannot be closed from here
    with pytest.raises(OverLimit):
        adm.handshake_slot("10.0.0.2")


def test_streams_per_peer() -> None:
    adm, _ = admission(streams_per_peer=1)
    slot = adm.stream_slot("hvA")
    with pytest.raises(OverLimit, match=r"1 streams of hvA running"):
        adm.stream_slot("hvA")
    adm.stream_slot("hvB").release()
    slot.release()
    adm.stream_slot("hvA")
