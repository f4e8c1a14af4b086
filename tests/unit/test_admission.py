"""Admission's bookkeeping: who holds which slot, and who is closed to make room."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry, Counter

from relay.core.config import Limits
from relay.daemon.admission import Admission, OverLimit


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


def test_over_the_overall_cap_the_oldest_makes_room() -> None:
    adm, refused = admission(unauthenticated=4)
    closed: list[str] = []
    for name, address in [("a1", "10.0.0.1"), ("b1", "10.0.0.2"), ("b2", "10.0.0.2"), ("c1", "10.0.0.3")]:
        adm.unauthenticated_slot(address, lambda name=name: closed.append(name))  # type: ignore[misc]
    adm.unauthenticated_slot("10.0.0.4", lambda: closed.append("peer"))
    adm.unauthenticated_slot("10.0.0.5", lambda: closed.append("d1"))
    assert closed == ["a1", "b1"] and adm.unauthenticated == 4
    assert refused.labels("unauthenticated")._value.get() == 2


def test_a_flood_of_one_connection_per_address_does_not_evict_a_busy_peer() -> None:
    """A peer relay authenticating two connections at once (libvirt.sock and migration.sock)
    is the busiest source during a flood from many addresses (any IPv6 /64 has 2^64): it must
    not be the one closed to make room."""
    adm, _ = admission(unauthenticated=64)
    closed: list[str] = []
    for i in range(62):
        adm.unauthenticated_slot(f"2001:db8:{i + 1:x}::1", lambda: closed.append("flood"))
    adm.unauthenticated_slot("192.0.2.2", lambda: closed.append("peer"))
    adm.unauthenticated_slot("192.0.2.2", lambda: closed.append("peer"))
    for i in range(2):
        adm.unauthenticated_slot(f"2001:db8:1:{i:x}::1", lambda: closed.append("flood"))
    assert closed == ["flood", "flood"]


def test_eviction_costs_the_same_whatever_the_number_of_source_addresses() -> None:
    """It runs on the thread that runs every pump: no scan over the sources per arrival."""

    def per_admission(addresses: int) -> float:
        adm, _ = admission(unauthenticated=1024, unauthenticated_per_address=1024)
        for i in range(1024):
            adm.unauthenticated_slot(f"10.0.{(i % addresses) >> 8}.{(i % addresses) & 255}", lambda: None)
        started = time.perf_counter()
        for i in range(300):
            a = (1024 + i) % addresses
            adm.unauthenticated_slot(f"10.0.{a >> 8}.{a & 255}", lambda: None)
        return (time.perf_counter() - started) / 300

    few, many = per_admission(32), per_admission(4096)
    assert many < 5 * few, f"{many * 1e6:.0f} us per admission from 4096 addresses, {few * 1e6:.0f} us from 32"


def test_the_per_address_cap_counts_an_ipv6_64_as_one_source() -> None:
    adm, _ = admission(unauthenticated_per_address=2)
    adm.unauthenticated_slot("2001:db8:0:1::1")
    adm.unauthenticated_slot("2001:db8:0:1:ffff::2")
    with pytest.raises(OverLimit):
        adm.unauthenticated_slot("2001:db8:0:1::3")
    adm.unauthenticated_slot("2001:db8:0:2::1")  # another /64
    adm.unauthenticated_slot("::ffff:10.0.0.1")  # IPv4-mapped: that IPv4 address
    adm.unauthenticated_slot("10.0.0.1")
    with pytest.raises(OverLimit):
        adm.unauthenticated_slot("10.0.0.1")


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
