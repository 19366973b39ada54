"""A bounded fuzz run of the wire decoder: mutants of valid datagrams, signed and not.

Owns nothing but this check. protocol.wire.decode promises a value for any input; this
takes valid datagrams of every message type (random field values), mutates them (bit
flips, byte overwrites, inserts, deletes, truncations, extensions, splices, length bytes
set to extremes) and feeds each mutant to decode twice:

* as it is: it must come back as a DecodeError (the MAC catches every change), never a
  Decoded and never an exception;
* re-signed with the cluster key: what a buggy or newer cell could send. The parser
  behind the MAC must answer MALFORMED / UNKNOWN_TYPE / BAD_VERSION / OVERSIZED, or a
  Decoded whose re-encoding gives back the very same bytes (the encoding is canonical).
  An exception caught by decode's last-resort handler counts as a failure here.

    python -m simulations.fuzz_wire --seconds 50 --seed 1

prints the counts and exits 1 if anything went wrong.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import blake3

from protocol import wire
from protocol.placement import Announce, LeaseStatus, Lookup, LookupReply, ProviderInfo, Withdraw
from protocol.swarm import HaveQuery, HaveReply, PieceCancel, PieceReply, PieceRequest, PieceStatus
from protocol.wire import (
    Ack,
    Alive,
    Dead,
    Decoded,
    DecodeError,
    Gossip,
    MemberState,
    Nack,
    Ping,
    PingReq,
    PushPull,
    Reason,
    Status,
    Suspect,
)

KEY = bytes(range(32))
NOW = 1_700_000_000.0


@dataclass
class FuzzReport:
    iterations: int = 0
    exceptions: int = 0  # escaped decode, or reached its last-resort handler
    decoded_mutants: int = 0  # an unsigned mutant that decoded: a MAC failure
    noncanonical: int = 0  # a re-signed mutant that decoded to a different encoding
    reasons: Counter[Reason] = field(default_factory=Counter)  # unsigned mutants
    signed_reasons: Counter[str] = field(default_factory=Counter)  # re-signed ones
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.exceptions or self.decoded_mutants or self.noncanonical)


def _name(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.7:
        return f"cell-{rng.randrange(100000)}"
    if pick < 0.9:
        return "".join(chr(rng.randrange(32, 0x2FF)) for _ in range(rng.randrange(1, 12)))
    return "x" * rng.randrange(1, 40)


def _digest(rng: random.Random) -> str:
    if rng.random() < 0.8:
        return "sha256:" + rng.randbytes(32).hex()
    return "sha512:" + rng.randbytes(rng.randrange(0, 24)).hex()


def _bitmap(rng: random.Random) -> int:
    return rng.getrandbits(rng.choice((0, 8, 64, 768)))


def _update(rng: random.Random) -> wire.Update:
    i = rng.randrange(2**32)
    kind = rng.randrange(3)
    if kind == 0:
        return Alive(_name(rng), i, f"10.0.{rng.randrange(256)}.1:7946", _name(rng))
    return (Suspect if kind == 1 else Dead)(_name(rng), i, _name(rng))


def random_message(rng: random.Random) -> wire.Message:
    """A valid message of a random registered type with random field values."""
    ups = tuple(_update(rng) for _ in range(rng.randrange(6)))
    n = rng.randrange(2**32)
    choices = [
        lambda: Ping(n, _name(rng), ups),
        lambda: Ack(n, ups),
        lambda: Nack(n, ups),
        lambda: PingReq(n, _name(rng), _name(rng), rng.random() < 0.5, ups),
        lambda: Gossip(ups),
        lambda: PushPull(
            n,
            rng.random() < 0.5,
            rng.random() < 0.5,
            rng.randrange(4),
            rng.randrange(1, 5),
            tuple(
                MemberState(_name(rng), n, _name(rng), _name(rng), rng.choice(list(Status)))
                for _ in range(rng.randrange(6))
            ),
        ),
        lambda: Announce(
            _digest(rng),
            _name(rng),
            rng.random() < 0.5,
            _bitmap(rng),
            rng.randrange(1000),
            rng.randrange(100),
            rng.uniform(0, 60),
            rng.random() < 0.5,
        ),
        lambda: Withdraw(_digest(rng)),
        lambda: Lookup(_digest(rng), _name(rng), n, rng.random() < 0.5),
        lambda: LookupReply(
            _digest(rng),
            n,
            tuple(
                ProviderInfo(
                    _name(rng), _name(rng), rng.random() < 0.5, _bitmap(rng), rng.randrange(99)
                )
                for _ in range(rng.randrange(5))
            ),
            rng.choice(list(LeaseStatus)),
            rng.choice(("", _name(rng))),
            rng.randrange(1000),
            rng.random() < 0.5,
        ),
        lambda: PieceRequest(_digest(rng), n),
        lambda: PieceReply(
            _digest(rng), n, rng.choice(list(PieceStatus)), _bitmap(rng), rng.random() < 0.5
        ),
        lambda: PieceCancel(_digest(rng), n),
        lambda: HaveQuery(_digest(rng), _bitmap(rng)),
        lambda: HaveReply(_digest(rng), _bitmap(rng), rng.random() < 0.5),
    ]
    return rng.choice(choices)()


def mutate(data: bytes, rng: random.Random, other: bytes) -> bytes:
    """One to three random mutations; the result always differs from `data`."""
    b = bytearray(data)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(9)
        pos = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # overwrite a byte, often with an extreme
            b[rng.randrange(len(b))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2:  # insert random bytes
            b[pos:pos] = rng.randbytes(rng.randrange(1, 8))
        elif op == 3 and b:  # delete a range
            del b[pos : pos + rng.randrange(1, 8)]
        elif op == 4:  # truncate
            del b[pos:]
        elif op == 5:  # extend
            b += rng.randbytes(rng.randrange(1, 64))
        elif op == 6:  # splice in part of another datagram
            j = rng.randrange(len(other) + 1)
            b[pos:] = other[j:]
        elif op == 7 and len(b) > 2:  # duplicate a chunk
            i = rng.randrange(len(b) - 1)
            b[pos:pos] = b[i : i + rng.randrange(1, 16)]
        elif op == 8:  # grow the datagram past the limit
            b += bytes(wire.MAX_DATAGRAM)
    if bytes(b) == data:
        b.append(rng.randrange(256))
    return bytes(b)


def resign(data: bytes) -> bytes:
    """`data` with its last 16 bytes replaced by a valid MAC over the rest."""
    body = data[: max(len(data) - wire.MAC_LEN, 0)]
    return body + blake3.blake3(body, key=wire._mac_key(KEY)).digest(wire.MAC_LEN)


def _check(report: FuzzReport, data: bytes, *, signed: bool) -> None:
    try:
        out = wire.decode(data, key=KEY, now=NOW, replay=None)
    except Exception as exc:  # decode must never let one out
        report.exceptions += 1
        report.failures.append(f"raised {exc!r} on {data.hex()}")
        return
    if isinstance(out, DecodeError):
        if out.detail.startswith("decoder:"):  # the last-resort handler caught a bug
            report.exceptions += 1
            report.failures.append(f"{out.detail} on {data.hex()}")
        if signed:
            report.signed_reasons[out.reason.value] += 1
        else:
            report.reasons[out.reason] += 1
        return
    if not signed:
        report.decoded_mutants += 1
        report.failures.append(f"unsigned mutant decoded: {data.hex()}")
        return
    report.signed_reasons["decoded"] += 1
    assert isinstance(out, Decoded)
    again = wire.encode(out.msg, key=KEY, sender=out.sender, seq=out.seq, now=out.timestamp)
    if again != data:
        report.noncanonical += 1
        report.failures.append(f"non-canonical: {data.hex()} -> {again.hex()}")


def fuzz(
    *, iterations: int | None = None, seconds: float | None = None, seed: int = 0
) -> FuzzReport:
    """Run until `iterations` mutants were tried or `seconds` passed (wall clock)."""
    rng = random.Random(seed)
    report = FuzzReport()
    deadline = time.monotonic() + seconds if seconds is not None else None
    corpus = [
        wire.encode(random_message(rng), key=KEY, sender=_name(rng), seq=i, now=NOW)
        for i in range(64)
    ]
    while True:
        if iterations is not None and report.iterations >= iterations:
            break
        if deadline is not None and report.iterations % 256 == 0 and time.monotonic() > deadline:
            break
        if rng.random() < 0.05:  # keep the corpus fresh
            corpus[rng.randrange(len(corpus))] = wire.encode(
                random_message(rng), key=KEY, sender=_name(rng), seq=1, now=NOW
            )
        mutant = mutate(rng.choice(corpus), rng, rng.choice(corpus))
        if mutant in corpus:  # a splice can rebuild another valid datagram whole
            continue
        _check(report, mutant, signed=False)
        _check(report, resign(mutant), signed=True)
        report.iterations += 1
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    started = time.monotonic()
    r = fuzz(seconds=args.seconds, seed=args.seed)
    took = time.monotonic() - started
    print(f"{r.iterations} mutants in {took:.1f} s ({2 * r.iterations / took:.0f} decodes/s)")
    print("unsigned:", ", ".join(f"{k.value} {v}" for k, v in r.reasons.most_common()))
    print("re-signed:", ", ".join(f"{k} {v}" for k, v in r.signed_reasons.most_common()))
    print(
        f"exceptions {r.exceptions}, unsigned mutants decoded {r.decoded_mutants}, "
        f"non-canonical {r.noncanonical}"
    )
    for line in r.failures[:10]:
        print("FAIL", line)
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
