"""One cell's daemon: the tree of tasks `celld serve` runs.

Owns startup order (store recovery before any listener opens), the nursery
every fetch and connection lives in, periodic bookkeeping, and shutdown on
SIGINT/SIGTERM. Reads the tree top-down: serve() -> store, sources, mirror,
metrics listener, bookkeeping.
"""

from __future__ import annotations

import functools
import gc
import logging
import signal
import urllib.request
from dataclasses import dataclass

import httpx
import trio

from celld import http as http_server
from celld.admin import MAX_BODY, Admin, parse_platform
from celld.config import Config, load_cluster_key
from celld.gossip import Gossip
from celld.http_client import Pool
from celld.listen import ListenError, naming
from celld.metrics import Metrics
from celld.mirror import Mirror
from celld.peering import Peering
from celld.sources import Sources
from celld.stage import Stager
from celld.store import Store, StoreLocked

log = logging.getLogger("celld")

FLUSH_INTERVAL = 5.0


@dataclass(frozen=True)
class Running:
    """What a started daemon tells its starter: where it listens."""

    mirror: tuple[str, int]
    metrics: tuple[str, int] | None
    store: Store
    sources: Sources
    metrics_registry: Metrics
    gossip: Gossip | None = None


def _address(listeners: list[trio.SocketListener]) -> tuple[str, int]:
    host, port = listeners[0].socket.getsockname()[:2]
    return host, port


async def serve(config: Config, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    cluster_key = load_cluster_key(config)
    try:
        store = await trio.to_thread.run_sync(Store.open, config.data_dir)
    except StoreLocked:
        # Its admin socket, store and index are another daemon's: say so, as a listener would.
        raise ListenError("cell.data_dir", config.data_dir, "in use by another celld") from None
    store.max_bytes = config.max_bytes
    pool = _blob_pool()
    try:
        metrics = Metrics()
        metrics.store_bytes.set(store.total_bytes())
        metrics.store_blobs.set(len(store))
        timeout = httpx.Timeout(30.0, connect=config.connect_timeout)
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        async with (
            httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=True) as client,
            trio.open_nursery() as nursery,
        ):
            sources = Sources(config, store, metrics, nursery, client, pool=pool)
            mirror = Mirror(sources, store, metrics, cluster_key)
            stager = Stager(config, store, sources, client, cluster_key)
            gossip = _gossip(config, cluster_key, metrics)
            peering = None
            if gossip is not None and config.cluster is not None and cluster_key is not None:
                peering = Peering(
                    config.name,
                    config.cluster.zone,
                    cluster_key,
                    store,
                    metrics,
                    gossip,
                    upload_slots=config.peer.upload_slots,
                    upload_rate=config.peer.upload_rate,
                    stall_timeout=config.peer.stall_timeout,
                )
                sources.peering = peering
            admin = Admin(
                config,
                store,
                stager,
                metrics,
                parse_platform(config.platform),
                peering=peering,
                removed=sources.removed,
            )
            listen = config.mirror_listen
            with naming("mirror.listen", listen):
                listeners = await nursery.start(
                    http_server.serve, listen.host, listen.port, mirror.handle
                )
            metrics_addr = None
            if config.metrics_listen is not None:
                ml = config.metrics_listen
                with naming("metrics.listen", ml):
                    mlisteners = await nursery.start(
                        http_server.serve, ml.host, ml.port, metrics.handle
                    )
                metrics_addr = _address(mlisteners)
            with naming("cell.data_dir", config.admin_socket):
                await nursery.start(
                    functools.partial(http_server.serve_unix, max_body=MAX_BODY),
                    config.admin_socket,
                    admin.handle,
                )
            if gossip is not None and peering is not None and config.cluster is not None:
                cl = config.cluster.listen
                with naming("cluster.listen", cl):
                    await gossip.bind()
                    await nursery.start(http_server.serve, cl.host, cl.port, peering.peer.handle)
                await nursery.start(peering.run)
                await nursery.start(gossip.run)
            nursery.start_soon(_bookkeeping, store)
            running = Running(_address(listeners), metrics_addr, store, sources, metrics, gossip)
            log.info(
                "cell %s: mirror on %s:%d, metrics on %s, data in %s",
                config.name,
                *running.mirror,
                f"{metrics_addr[0]}:{metrics_addr[1]}" if metrics_addr else "off",
                config.data_dir,
            )
            # What start-up made lives as long as the daemon (the store's index,
            # every module): frozen, a full collection scans only what requests
            # made since, and stops costing tens of ms in the middle of a pull.
            gc.freeze()
            task_status.started(running)
    finally:
        if pool is not None:
            with trio.CancelScope(shield=True):
                await pool.aclose()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(_close_store, store)


def _gossip(config: Config, key: bytes | None, metrics: Metrics) -> Gossip | None:
    cluster = config.cluster
    if cluster is None or key is None:
        return None
    return Gossip(
        config.name,
        (cluster.listen.host, cluster.listen.port),
        str(cluster.advertise),
        cluster.zone,
        key,
        [str(s) for s in cluster.seeds],
        metrics.registry,
    )


def _blob_pool() -> Pool | None:
    """The lean client for blob GETs (celld.http_client), unless the environment
    names a proxy: then httpx, which knows proxies, carries them too."""
    if any(urllib.request.getproxies().get(s) for s in ("http", "https", "all")):
        return None
    return Pool()


def _close_store(store: Store) -> None:
    store.flush_access()
    store.close()


async def _bookkeeping(store: Store) -> None:
    """Writes batched last-access times, so the hit path never waits on SQLite."""
    while True:
        await trio.sleep(FLUSH_INTERVAL)
        await trio.to_thread.run_sync(store.flush_access)


async def run_until_signalled(config: Config) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            running: Running = await nursery.start(serve, config)
            async for signum in signals:
                log.info("received %s, shutting down", signal.Signals(signum).name)
                if running.gossip is not None:
                    await running.gossip.leave()
                nursery.cancel_scope.cancel()
                break
