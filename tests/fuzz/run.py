"""Coverage-guided fuzzing (atheris, libFuzzer for Python) of the header readers and the control parser.

    python -m tests.fuzz.run TARGET [libFuzzer options] [CORPUS_DIR ...]      TARGET: request, reply, control

An input's first byte says how many cuts follow (2 bytes each, big-endian offsets); the rest is
fed to the reader in the chunks those cuts make, and judged by the very checks the Hypothesis
tests use (tests/fuzz/invariants.py). Any exception the checks do not expect, an AssertionError
included, is a finding: libFuzzer prints its traceback, writes the input to
<artifact_prefix>crash-<sha1>, and exits non-zero. An empty corpus folder is first seeded with
valid messages, so the fuzzer starts past the magic.

`make fuzz` runs each target for FUZZ_S seconds with a corpus kept in .fuzz/; `make test` runs
each for a few seconds (tests/fuzz/test_fuzz_targets.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

import atheris

# Coverage feedback comes from instrumented bytecode: the code under test and the checks.
with atheris.instrument_imports(include=["relay", "tests.fuzz"]):
    from relay.core import control_protocol
    from relay.core.errors import STATUS_FORBIDDEN, STATUS_OK
    from relay.core.protocol import Continue, Reply, Request, encode_reply, encode_request
    from tests.fuzz import invariants

MAX_CUTS: Final = 8


def split_input(data: bytes) -> tuple[bytes, list[int]]:
    """(the bytes to feed, the offsets to cut them at)."""
    count = data[0] % (MAX_CUTS + 1) if data else 0
    cuts = [int.from_bytes(data[1 + 2 * i : 3 + 2 * i], "big") for i in range(count)]
    return data[1 + 2 * count :], cuts


def make_input(blob: bytes, cuts: list[int] | None = None) -> bytes:
    cuts = cuts or []
    return bytes([len(cuts)]) + b"".join(c.to_bytes(2, "big") for c in cuts) + blob


TARGETS: Final[dict[str, Callable[[bytes, list[int]], object]]] = {
    "request": lambda blob, cuts: invariants.check_header_reader(blob, cuts, reply=False),
    "reply": lambda blob, cuts: invariants.check_header_reader(blob, cuts, reply=True),
    "control": lambda blob, cuts: invariants.check_control_reader(blob, cuts),
}


def seeds(target: str) -> list[bytes]:
    if target == "request":
        wires = [
            encode_request(Request("hvA", "migration.sock", 1)),
            encode_request(Request("hv-2.example.org", "1f2e3d4c-nbd.sock", 2**64 - 1)) + b"first payload",
            encode_request(Continue("hvA", "migration.sock", 3_000_000_000)),
        ]
    elif target == "reply":
        wires = [encode_reply(Reply(STATUS_OK)), encode_reply(Reply(STATUS_FORBIDDEN, "not allowed")) + b"NBDMAGIC"]
    else:
        requests: list[control_protocol.ControlRequest] = [
            control_protocol.OpenSession("hv2"),
            control_protocol.CloseSession("1f2e3d4c"),
        ]
        requests += [control_protocol.ListSessions(), control_protocol.GetStatus()]
        # and one deep enough that a few copy mutations reach past the interpreter's recursion limit,
        # which only the nesting bound keeps json from hitting
        deep = b'{"op": "open", "peer": ' + b"[" * 600 + b"]" * 600 + b"}\n"
        wires = [control_protocol.encode_request(r) for r in requests] + [b'{"op": "open", "peer": [[5]]}\n', deep]
    return [make_input(w) for w in wires] + [make_input(w, [3, len(w) - 2]) for w in wires]


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python -m tests.fuzz.run {{{','.join(TARGETS)}}} [libFuzzer options] [CORPUS_DIR ...]")
    target = argv[1]
    for arg in argv[2:]:
        corpus = Path(arg)
        if not arg.startswith("-") and (not corpus.exists() or not any(corpus.iterdir())):
            corpus.mkdir(parents=True, exist_ok=True)
            for i, seed in enumerate(seeds(target)):
                (corpus / f"seed-{i}").write_bytes(seed)
    check = TARGETS[target]

    def one_input(data: bytes) -> None:
        check(*split_input(data))

    atheris.Setup([argv[0], *argv[2:]], one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
