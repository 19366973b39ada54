"""Prometheus metrics of one daemon, and the listener that exposes them.

Owns the metric names and labels operators graph. One CollectorRegistry per
daemon (not the process-global one) so several cells can run in one process,
as tests and the simulator's testbed do.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from celld.http import Request, Response

SOURCES = ("store", "registry", "upstream", "peer")


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "celld_mirror_requests",
            "Mirror requests by kind (manifest, blob, base) and outcome",
            ["kind", "outcome"],
            registry=r,
        )
        self.served_bytes = Counter(
            "celld_mirror_served_bytes",
            "Body bytes the mirror sent, by where they came from",
            ["kind", "source"],
            registry=r,
        )
        self.served = Counter(
            "celld_mirror_served",
            "Successful mirror responses by where the content came from",
            ["kind", "source"],
            registry=r,
        )
        self.fetches = Counter(
            "celld_fetches",
            "Fetches of content into the store by source and outcome",
            ["source", "outcome"],
            registry=r,
        )
        self.fetched_bytes = Counter(
            "celld_fetched_bytes", "Bytes fetched into the store by source", ["source"], registry=r
        )
        self.singleflight_joins = Counter(
            "celld_singleflight_joins",
            "Requests that joined a fetch already in flight instead of starting one",
            registry=r,
        )
        self.digest_mismatches = Counter(
            "celld_digest_mismatches",
            "Fetched bytes that did not match their digest (nothing stored)",
            ["source"],
            registry=r,
        )
        self.stale_tags = Counter(
            "celld_stale_tags_served",
            "Tags answered from the last known digest because no source answered",
            registry=r,
        )
        self.evictions = Counter(
            "celld_store_evictions", "Blobs evicted to keep the store under max_bytes", registry=r
        )
        self.unauthorized = Counter(
            "celld_mirror_unauthorized",
            "Requests for private content without a valid pull token",
            registry=r,
        )
        self.peer_requests = Counter(
            "celld_peer_requests",
            "Peer API requests served, by endpoint (blob, table, piece, have) and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.peer_auth_failures = Counter(
            "celld_peer_auth_failures",
            "Peer API requests refused with 401, by reason (missing, bad_mac, stale, ...)",
            ["reason"],
            registry=r,
        )
        self.peer_sent_bytes = Counter(
            "celld_peer_sent_bytes",
            "Body bytes sent to peers, by endpoint",
            ["endpoint"],
            registry=r,
        )
        self.peer_received_bytes = Counter(
            "celld_peer_received_bytes",
            "Piece bytes received from peers and verified (blake3) before being written",
            registry=r,
        )
        self.peer_tables_hashed = Counter(
            "celld_peer_tables_hashed",
            "Piece tables hashed from a stored blob's file on a peer's first ask (a blob"
            " stored before this process started: one fetched here keeps its table)",
            registry=r,
        )
        self.registry_reads = Counter(
            "celld_registry_reads",
            "Blobs a cluster cell read from the registries, by why: lease (granted it),"
            " no_lease (its lookup heard no lease and no provider), unfinished (its lookup"
            " never ended), no_table (no provider gave a piece table), stalled (no piece"
            " came from peers for [peer] stall_timeout: the missing pieces, by range)",
            ["why"],
            registry=r,
        )
        self.peer_bad_pieces = Counter(
            "celld_peer_bad_pieces",
            "Pieces from peers that failed their hash (the sender is charged, then banned)",
            registry=r,
        )
        self.store_bytes = Gauge("celld_store_bytes", "Bytes of verified blobs stored", registry=r)
        self.store_blobs = Gauge("celld_store_blobs", "Verified blobs stored", registry=r)

    async def handle(self, request: Request) -> Response:
        if request.target.split(b"?", 1)[0] != b"/metrics":
            return Response(404, [("Content-Type", "text/plain")], b"not found\n")
        body = generate_latest(self.registry)
        return Response(200, [("Content-Type", CONTENT_TYPE_LATEST)], body)
