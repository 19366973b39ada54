"""The daemon's transport around protocol.cell.Cell: placement over gossip, pieces over HTTP.

Owns the cell's one `protocol.cell.Cell` (its announcer, directory, uploader, downloads
and lookups), the task that runs its timers, and carrying out every action it returns:
a placement datagram goes out through celld.gossip (or straight back in, when the cell
is a home of its own digest); a piece request becomes a signed GET to the peer
(celld.peer.PeerClient) whose verified bytes are written where they belong in the
download's temp file; a have query and its answer (parked or not) are datagrams too, as
in the simulator (simulations/model/celld.py), the other transport of the same Cell, with
the same parameters: what differs is only how bytes and datagrams travel.

Also owns what a download looks like to the rest of the daemon (`Transfer`): its temp
file, the piece table that checks every piece (blake3) before it is written, the pieces
held, and the contiguous prefix the runtime may be streamed. That prefix is hashed with
sha256 in order as it grows, so the blob's digest is checked the moment its last piece
lands; nothing is stored or announced complete before it matches.

Never: chooses a piece, a peer or a lease holder (protocol.swarm and protocol.placement
do), reads a registry (celld.sources does, for the lease holder), or trusts a byte from a
peer that its piece hash did not check.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from celld.gossip import Gossip
from celld.gossip import Peer as GossipPeer
from celld.metrics import Metrics
from celld.peer import Complete, Partial, Peer, PeerClient, PeerError, PieceAnswer, TableReply
from celld.store import BlobEntry, BlobWriter, Store
from protocol import placement as pl
from protocol import swarm as sw
from protocol.cell import Action, Cell, LeaseGranted, Located, SendHave, StartUpload
from protocol.pieces import PieceTable, piece_count, piece_size_for, piece_span

log = logging.getLogger(__name__)

# seconds without a new piece before a peer download reads the rest from the registries
# itself (the default of [peer] stall_timeout): longer than it takes membership to
# declare a provider dead in a small cluster (where no K confirmations shorten the
# suspicion), after which the lease moves and the registries go on
STALL_TIMEOUT = 30.0
LOCATE_TIMEOUT = 3.0  # > placement's lookup_give_up: the lookup always answers first
TABLE_WAIT = 5.0  # seconds a downloader waits for the lease holder's first verified piece
TABLE_RETRY = 0.05
MEMBER_POLL = 0.1  # seconds between looks at membership while waiting for a death
_NEVER = float("inf")


@dataclass(frozen=True)
class TableMiss:
    """`Peering.table` found no table: the cells it named that it could not reach at all
    (a refused or broken connection, or membership says they are gone), as opposed to
    ones that answered without one."""

    unreachable: frozenset[str]
    unknown: frozenset[str] = frozenset()  # of those, ones its membership had no row for
    asked: frozenset[str] = frozenset()  # every cell it named (see Peering.look_again)


@dataclass(eq=False)
class Transfer:
    """One blob coming from peers (or, for the lease holder, from a registry): what the
    temp file holds and what the runtime may already be sent."""

    digest: str
    writer: BlobWriter
    size: int
    piece_size: int
    table: PieceTable | None  # None while the lease holder's pieces are being hashed
    held: int = 0  # bitmap of pieces verified and written
    prefix: int = 0  # pieces 0..prefix-1 are hashed into the writer's sha256, in order
    registry: bool = False  # this cell holds the lease and reads the registries in order
    requests: dict[tuple[str, int], trio.CancelScope] = field(default_factory=dict)
    changed: trio.Event = field(default_factory=trio.Event)
    complete: bool = False  # every piece held (DownloadComplete)
    upstream: list[tuple[int, int]] = field(default_factory=list)  # FetchUpstream ranges
    table_from: str = ""
    private: frozenset[str] = frozenset()  # app scopes the blob is private to at its source
    last_progress: float = field(default_factory=time.monotonic)
    hashing: trio.Lock = field(default_factory=trio.Lock)  # one prefix advance at a time

    @property
    def count(self) -> int:
        return piece_count(self.size, self.piece_size)

    def notify(self) -> None:
        event, self.changed = self.changed, trio.Event()
        event.set()

    async def write(self, index: int, data: bytes | bytearray) -> None:
        """Writes a verified piece where it belongs in the temp file, and counts it held.

        The prefix's next piece (the swarm asks for the runtime's next pieces first, and
        a registry read comes in order, so most are) is appended with its sha256 taken
        from memory as it is written; one put further on is read back from the file and
        hashed when the prefix reaches it (`Peering._advance`). ValueError: the writer was
        closed meanwhile (a late copy); OSError: the temp file could not be written."""
        start, _ = piece_span(index, self.size, self.piece_size)
        if start == self.writer.written and not self.hashing.locked():
            async with self.hashing:
                await trio.to_thread.run_sync(self.writer.write_chunks, [data])
        else:
            await trio.to_thread.run_sync(self.writer.write_at, start, data)
        self.held |= 1 << index  # (releasing the lock lets no other task run first)


class Peering:
    """Runs the cell's placement and swarm among its peers (see the module docstring)."""

    def __init__(
        self,
        name: str,
        zone: str,
        key: bytes,
        store: Store,
        metrics: Metrics,
        gossip: Gossip,
        *,
        upload_slots: int = 4,
        upload_rate: int = 0,
        stall_timeout: float = STALL_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.stall_timeout = stall_timeout
        self.store = store
        self.metrics = metrics
        self.gossip = gossip
        self.clock = clock
        self.cell = Cell(name, zone, upload_slots=upload_slots, rng=random.Random(name))
        self.client = PeerClient(key, name)
        self.peer = Peer(
            key, self.cell.uploader, self, metrics, send_have=gossip.send, upload_rate=upload_rate
        )
        self.transfers: dict[str, Transfer] = {}
        self._located: dict[str, list[trio.MemorySendChannel[pl.LookupResult]]] = {}
        self._leases: dict[str, pl.LookupResult] = {}
        self._announced: dict[str, set[str]] = {}  # sender -> digests it announced to us
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self._until = 0.0  # when the timer task means to tick next (0: it is not asleep)
        gossip.listener = self

    # -- life ------------------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Announces what the store holds, then runs the cell's timers until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            now = self.clock()
            self._do(self.cell.set_members(self.gossip.live_ids(), now))
            for entry in self.store.entries():
                self._do(self.cell.hold(entry.digest, _pieces(entry.size), now))
            task_status.started()
            try:
                while True:
                    deadline = self.cell.next_deadline()
                    self._until = _NEVER if deadline is None else deadline
                    delay = self._until - self.clock()
                    if delay > 0:
                        with trio.move_on_after(min(delay, 3600.0)):
                            await self._wake.wait()
                        self._wake = trio.Event()
                        if self.clock() < self._until:
                            continue  # an input moved the deadline earlier: sleep to it
                    self._do(self.cell.tick(self.clock()))
            finally:
                with trio.CancelScope(shield=True):
                    await self.client.aclose()

    # -- gossip's listener -----------------------------------------------------------

    def members_changed(self, live: frozenset[str], now: float) -> None:
        self._do(self.cell.set_members(live, now))

    def member_gone(self, name: str, now: float) -> None:
        self._announced.pop(name, None)
        self._do(self.cell.member_dead(name, now))
        for t in self.transfers.values():
            for (peer, _), scope in list(t.requests.items()):
                if peer == name:
                    scope.cancel()  # its request_failed follows; the piece goes elsewhere

    def datagram(self, sender: str, msg: object, now: float) -> None:
        if isinstance(msg, pl.Announce):
            self._announced.setdefault(sender, set()).add(msg.digest)
        elif isinstance(msg, pl.Withdraw):
            self._announced.get(sender, set()).discard(msg.digest)
        if isinstance(msg, pl.Announce | pl.Withdraw | pl.Lookup | pl.LookupReply):
            self._do(self.cell.receive(sender, msg, now))
        elif isinstance(msg, sw.HaveQuery):
            self.peer.refresh(msg.digest)
            reply = self.cell.have_query(sender, msg.digest, msg.want, now)
            if reply is not None:
                self.gossip.send(sender, reply)
            self._do([])  # parked: the cell's timer answers it after have_wait at the latest
        elif isinstance(msg, sw.HaveReply):
            self._do(self.cell.have_arrived(sender, msg, now))

    def peers(self) -> list[GossipPeer]:
        """`celld peers`: gossip's rows, with the blobs each member announced to this
        cell (as one of their homes); this cell's own row counts what its store holds."""
        return [
            dataclasses.replace(
                row,
                blobs_announced=len(self.store)
                if row.name == self.name
                else len(self._announced.get(row.name, ())),
            )
            for row in self.gossip.peers()
        ]

    # -- the store's side ------------------------------------------------------------

    def holding(self, entry: BlobEntry) -> None:
        """A verified blob is in the store (fetched from anywhere): serve and announce it."""
        self.transfers.pop(entry.digest, None)
        self._do(self.cell.hold(entry.digest, _pieces(entry.size), self.clock()))

    def removed(self, digests: list[str]) -> None:
        """Eviction or gc removed these: withdraw them at once."""
        now = self.clock()
        for digest in digests:
            self._do(self.cell.drop(digest, now))

    def find(self, digest: str) -> Complete | Partial | None:
        """What the peer server may send of `digest` (celld.peer.BlobSource)."""
        entry = self.store.lookup(digest)
        if entry is not None:
            return Complete(
                entry.path,
                entry.size,
                table=self.store.piece_table(digest),  # hashed as it was fetched, if known
                private=self.store.private_scopes(digest),
            )
        t = self.transfers.get(digest)
        if t is None or t.table is None or not t.held:
            return None
        return Partial(t.writer.path, t.size, t.piece_size, t.table, t.held, t.private)

    def receiving(self, digest: str) -> int | None:
        """Bytes this cell's download of `digest` has written (celld.peer.BlobSource):
        0 while the lease holder waits for the registry's answer."""
        t = self.transfers.get(digest)
        if t is not None:
            return t.writer.written
        return 0 if digest in self._leases else None

    def corrupt(self, digest: str) -> None:
        """The peer server found a stored blob damaged: out of the store, withdrawn."""
        entry = self.store.lookup(digest)
        if entry is None:
            return
        self._spawn(self._drop_corrupt, entry)

    async def _drop_corrupt(self, entry: BlobEntry) -> None:
        await trio.to_thread.run_sync(self.store.delete, entry.digest)
        self.metrics.store_bytes.dec(entry.size)
        self.metrics.store_blobs.dec()
        self.removed([entry.digest])

    # -- asking peers ----------------------------------------------------------------

    async def locate(self, digest: str) -> pl.LookupResult | None:
        """Who provides `digest`, and whether this cell got the fetch lease."""
        send, receive = trio.open_memory_channel[pl.LookupResult](1)
        self._located.setdefault(digest, []).append(send)
        self._do(self.cell.lookup(digest, self.clock()))
        with trio.move_on_after(LOCATE_TIMEOUT):
            return await receive.receive()
        waiting = self._located.get(digest, [])
        if send in waiting:
            waiting.remove(send)
        return None

    def addr(self, member: str) -> str | None:
        m = self.gossip.membership.member(member)
        return None if m is None else m.addr

    async def table(self, result: pl.LookupResult) -> tuple[TableReply, str] | TableMiss:
        """The piece table, from a complete provider if there is one, else from the
        lease holder or another downloader (a partial table, refreshed as it grows).
        A lease holder that has not verified its first piece yet holds the request
        until it has (up to celld.peer.TABLE_PARK), else says 404 with the bytes it
        has taken in: it is asked again until TABLE_WAIT has passed since those last
        grew, since the registries are what the lease spares. (A fixed TABLE_WAIT sent
        cells to the Hub beside a live lease holder whose first piece took over 5 s on
        a shared 100 Mbit/s link, each one slowing every read on that link further.)"""
        ranked = sorted(
            result.providers,
            key=lambda p: (not p.complete, p.member != result.lease_holder, p.load),
        )
        names = [p.member for p in ranked]
        if result.lease_holder and result.lease_holder not in names:
            names.append(result.lease_holder)
        names = [n for n in names if n != self.name]
        asked = frozenset(names)
        deadline = trio.current_time() + TABLE_WAIT
        received: dict[str, int] = {}  # what each downloading provider said it had
        unreachable: set[str] = set()
        unknown: set[str] = set()
        while names:
            for member in list(names):
                addr = self.addr(member)
                if addr is None:
                    names.remove(member)
                    unreachable.add(member)
                    unknown.add(member)
                    continue
                left = deadline - trio.current_time()
                try:
                    reply = await self.client.table(addr, result.digest, wait=max(0.0, left))
                    return reply, member
                except PeerError as exc:
                    if exc.received is not None and exc.received > received.get(member, -1):
                        received[member] = exc.received  # it moves: wait for its first piece
                        deadline = max(deadline, trio.current_time() + TABLE_WAIT)
                    live = member in self.gossip.live_ids()
                    if exc.status != 404 or not live:
                        log.info("no piece table of %s from %s: %s", result.digest, member, exc)
                        names.remove(member)
                        if exc.status is None or not live:
                            unreachable.add(member)
            if trio.current_time() > deadline:
                break
            await trio.sleep(TABLE_RETRY)
        return TableMiss(frozenset(unreachable), frozenset(unknown), asked)

    async def look_again(self, miss: TableMiss, digest: str) -> pl.LookupResult | None:
        """A new lookup of `digest` after every cell `table` named answered without a
        table, when it names a cell that was not asked or grants this cell the lease;
        None: the registries. The homes may have named a holder that never read the
        blob (its grant's reply was lost, and it followed another cell): by now the
        cell that does read has announced the lease, and its homes name it."""
        result = await self.locate(digest)
        if result is None:
            return None
        named = {p.member for p in result.providers} | {result.lease_holder}
        fresh = named - miss.asked - {"", self.name}
        if result.lease != pl.LeaseStatus.GRANTED and not fresh:
            return None
        log.info(
            "%s: no piece table from %s; the homes now name %s",
            digest,
            ", ".join(sorted(miss.asked)) or "nobody",
            "this cell for the lease"
            if result.lease == pl.LeaseStatus.GRANTED
            else ", ".join(sorted(fresh)),
        )
        return result

    async def relocate(self, miss: TableMiss, digest: str) -> pl.LookupResult | None:
        """A new lookup of `digest` once every cell `table` could not reach has been
        declared dead (or has left), and the homes answer without them, or the ones it
        had never heard of are known now, within stall_timeout; None: one stayed alive
        to membership that long (or `table` reached every cell it asked).

        A lease holder killed while this cell waited for its first piece is still alive
        to membership for a few seconds, and its homes hand the lease on only once it is
        not: reading the blob from the registries at once, without the lease, cost a
        kill storm a second copy of the layer when the lease then went to another cell.
        A lease holder this cell had not heard of yet (its membership still converging)
        is as good as any once it is known: before, it counted as gone, its homes kept
        naming it, and the cell read the layer from the Hub after stall_timeout."""
        gone = miss.unreachable
        if not gone:
            return None

        def known(member: str) -> bool:  # one `table` had no address for, known now
            return member in miss.unknown and member in self.gossip.live_ids()

        with trio.move_on_after(self.stall_timeout):
            while (gone - miss.unknown) & self.gossip.live_ids():
                await trio.sleep(MEMBER_POLL)
            log.info("%s: %s unreachable, looking up again", digest, ", ".join(sorted(gone)))
            while True:
                result = await self.locate(digest)
                holder = result.lease_holder if result is not None else ""
                if result is None or holder not in gone or known(holder):
                    break
                await trio.sleep(MEMBER_POLL)  # a home that has not heard of the death
            if result is not None:
                kept = tuple(p for p in result.providers if p.member not in gone or known(p.member))
                result = dataclasses.replace(result, providers=kept)
            return result
        return None

    def start(self, t: Transfer, result: pl.LookupResult) -> None:
        """Run the swarm's download of `t` (pieces from peers, or the lease's registry read
        when this cell holds it)."""
        self.transfers[t.digest] = t
        self._do(self.cell.download(t.digest, t.count, self.clock(), located=result))

    def lease(self, digest: str, result: pl.LookupResult) -> None:
        """This cell goes to the registries for `digest` (granted the lease, or nobody
        else has it): remembered until the registry's answer tells the blob's size."""
        self._leases[digest] = result

    def reading(self, digest: str, writer: BlobWriter, size: int) -> Transfer | None:
        """The registry's head arrived for a digest this cell looked up: announce it as
        downloading (with the lease), so others take its pieces as they verify."""
        result = self._leases.pop(digest, None)
        if result is None or size <= 0:
            return None
        t = Transfer(digest, writer, size, piece_size_for(size), None, registry=True)
        self.start(t, result)
        return t

    async def registry_piece(self, t: Transfer, index: int, ok: bool) -> None:
        """A piece of a peer transfer read from the registries (the lease came to this
        cell): written (ok), or to be planned again (not ok)."""
        if ok:
            t.held |= 1 << index
            self.peer.grew(t.digest)
            t.last_progress = time.monotonic()
            await self._advance(t)
        self._do(self.cell.registry_piece(t.digest, index, ok, self.clock()))
        t.notify()

    def registry_pieces(self, t: Transfer, table: PieceTable, held: int) -> None:
        """The lease holder's stream verified (blake3) and wrote more pieces."""
        t.table = table
        now = self.clock()
        new = held & ~t.held
        t.held |= new
        if new:
            self.peer.grew(t.digest)
        while new:
            low = new & -new
            self._do(self.cell.registry_piece(t.digest, low.bit_length() - 1, True, now))
            new ^= low

    def finished(self, t: Transfer, entry: BlobEntry | None) -> None:
        """The transfer ended: stored (then announced complete), or given up."""
        for scope in t.requests.values():
            scope.cancel()
        if self.transfers.get(t.digest) is t:
            del self.transfers[t.digest]
        if entry is not None:
            self.holding(entry)
        else:
            self._do(self.cell.abandon(t.digest, self.clock()))

    async def follow(self, t: Transfer, fetch) -> None:
        """Until every piece of `t` is in and hashed (t.complete), or the lease came to
        this cell (t.upstream: the caller reads the registries); the runtime's waiters
        (`fetch`, a celld.sources.Fetch) are woken as the verified prefix grows. Raises
        PeerError when nothing arrived for `stall_timeout` ([peer] stall_timeout)."""
        while True:
            if fetch.written != t.writer.written:
                fetch.written = t.writer.written
                fetch.notify()
            if t.upstream and not t.complete:
                return
            if t.complete and t.writer.written == t.size:
                return
            with trio.move_on_after(1.0):
                await t.changed.wait()
            if time.monotonic() - t.last_progress > self.stall_timeout:
                raise PeerError(f"no piece of {t.digest} arrived for {self.stall_timeout:g} s")

    def bad_table(self, t: Transfer) -> None:
        """Every piece matched its table but the blob not its digest: the table was
        wrong, and so is whoever gave it."""
        log.error("the piece table of %s from %s is wrong: the blob fails its digest",
                  t.digest, t.table_from)  # fmt: skip
        self.metrics.peer_bad_pieces.inc()

    async def small_blob(
        self, digest: str, limit: int
    ) -> tuple[bytes, tuple[str, ...], str] | None:
        """A small blob (a manifest) whole from a complete provider: its bytes, the app
        scopes it is private to there, and who sent it. The caller checks the digest."""
        result = await self.locate(digest)
        if result is None:
            return None
        for p in result.providers:
            addr = self.addr(p.member)
            if not p.complete or addr is None or p.member == self.name:
                continue
            try:
                reply = await self.client.table(addr, digest)
                if reply.table.blob_size > limit:
                    return None
                async with self.client.blob(addr, digest) as body:
                    data = b"".join([c async for c in body.chunks()])
                return data, tuple(sorted(reply.private)), p.member
            except PeerError as exc:
                log.info("%s from %s: %s", digest, p.member, exc)
        return None

    # -- actions ---------------------------------------------------------------------

    def _do(self, actions: list[Action]) -> None:
        for a in actions:
            kind = type(a)
            if kind is pl.Send:
                if a.to == self.name:
                    self._do(self.cell.receive(self.name, a.message, self.clock()))
                else:
                    self.gossip.send(a.to, a.message)
            elif kind is sw.RequestPiece:
                self._request(a.peer, a.digest, a.index)
            elif kind is sw.CancelPiece:
                t = self.transfers.get(a.digest)
                scope = t.requests.pop((a.peer, a.index), None) if t is not None else None
                if scope is not None:
                    scope.cancel()
            elif kind is sw.QueryHave:
                # a lost query or answer: the download's query deadline asks again
                self.gossip.send(a.peer, sw.HaveQuery(a.digest, a.want))
            elif kind is SendHave:
                self.gossip.send(a.to, a.reply)
            elif kind is Located:
                for send in self._located.pop(a.result.digest, []):
                    send.send_nowait(a.result)
            elif kind is sw.FetchUpstream:
                t = self.transfers.get(a.digest)
                if t is not None and not t.registry:
                    t.upstream.extend(a.ranges)
                    t.notify()
            elif kind is sw.DownloadComplete:
                t = self.transfers.get(a.digest)
                if t is not None and not t.registry:
                    t.complete = True
                    t.notify()
            elif kind is sw.BadPiece:
                self.metrics.peer_bad_pieces.inc()
                log.warning("piece %d of %s from %s failed its hash", a.index, a.digest, a.peer)
            elif kind is sw.PeerBanned:
                log.warning("%s banned for %s after %d bad pieces", a.peer, a.digest, a.bad_pieces)
            elif kind is LeaseGranted:
                log.info("fetch lease of %s: this cell reads it from the registries", a.digest)
            elif kind is StartUpload:  # the peer server starts queued uploads itself
                self._do(self.cell.upload_done(a.to, a.reply.digest, a.reply.index, self.clock()))
        # The timer task sleeps until the cell's next deadline; wake it only when an
        # input moved that deadline earlier. Waking it on every input (each piece,
        # datagram and request) ran Cell.tick a few thousand times a second in a storm
        # for nothing, a third of a cell's CPU on the testbed.
        deadline = self.cell.next_deadline()
        if deadline is not None and deadline < self._until:
            self._until = deadline
            self._wake.set()

    def _spawn(self, fn, *args) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    def _request(self, peer: str, digest: str, index: int) -> None:
        t = self.transfers.get(digest)
        if t is None or t.registry or t.table is None:
            return  # the lease holder's registry read brings every piece in order
        scope = trio.CancelScope()
        t.requests[(peer, index)] = scope
        self._spawn(self._piece, t, peer, index, scope)

    async def _piece(self, t: Transfer, peer: str, index: int, scope: trio.CancelScope) -> None:
        addr = self.addr(peer)
        outcome: tuple | None = None
        with scope:
            try:
                if addr is None:
                    raise PeerError(f"{peer} has no address")
                assert t.table is not None
                got = await self.client.piece(addr, t.digest, index, t.table)
                if got.answer is PieceAnswer.OK:
                    if got.learned is not None:  # before `held`: find() serves its hash
                        merged = t.table.with_hash(index, got.learned)
                        if not isinstance(merged, PieceTable):
                            self.client.recycle(got.data)
                            raise PeerError(f"{peer}'s hash of piece {index} disagrees")
                        t.table = merged
                    await t.write(index, got.data)
                    self.client.recycle(got.data)
                    if t.writer.closed:
                        return
                    self.peer.grew(t.digest)
                    t.last_progress = time.monotonic()
                    self.metrics.peer_received_bytes.inc(t.table.span(index)[1])
                    # The sha256 of the prefix runs beside the next request, not before it.
                    self._spawn(self._advance, t)
                outcome = ("got", got)
            except PeerError as exc:
                log.info("piece %d of %s from %s: %s", index, t.digest, peer, exc)
                outcome = ("error", None)
            except ValueError:  # a late copy: the writer was committed or aborted meanwhile
                return
            except OSError as exc:  # the temp file (full disk): the transfer is over
                log.error("writing %s: %s", t.digest, exc)
                return
        if t.requests.get((peer, index)) is scope:
            del t.requests[(peer, index)]
        now = self.clock()
        if scope.cancelled_caught and outcome is None:
            self._do(self.cell.request_failed(peer, t.digest, index, now))
            return
        if outcome is None:
            return
        if outcome[0] == "error":
            self._do(self.cell.request_failed(peer, t.digest, index, now))
            return
        got = outcome[1]
        if got.answer is PieceAnswer.OK or got.answer is PieceAnswer.BAD:
            ok = got.answer is PieceAnswer.OK
            self._do(
                self.cell.piece_arrived(
                    peer, t.digest, index, ok, now, have=got.have, complete=got.complete
                )
            )
        else:
            status = (
                sw.PieceStatus.BUSY if got.answer is PieceAnswer.BUSY else sw.PieceStatus.MISSING
            )
            reply = sw.PieceReply(t.digest, index, status, got.have, got.complete)
            self._do(self.cell.piece_refused(peer, reply, now))
        t.notify()

    async def _advance(self, t: Transfer) -> None:
        """Hash the pieces that now follow the contiguous prefix, in order."""
        async with t.hashing:
            try:
                await self._advance_locked(t)
            except (ValueError, OSError) as exc:
                # Closed meanwhile (the transfer ended: nothing to say), or the temp
                # file could not be read back: the transfer stalls, and the stall
                # timeout takes the rest from the registries.
                if not t.writer.closed:
                    log.error("hashing %s: %s", t.digest, exc)

    async def _advance_locked(self, t: Transfer) -> None:
        count = t.count
        start = t.prefix
        while t.prefix < count and t.held >> t.prefix & 1:
            t.prefix += 1
        if t.prefix == start:
            return
        end = t.size if t.prefix == count else t.prefix * t.piece_size
        n = end - t.writer.written
        if n > 0:
            await trio.to_thread.run_sync(t.writer.advance, n)
        t.notify()


def _pieces(size: int) -> int:
    return piece_count(size, piece_size_for(size))
