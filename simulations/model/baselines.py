"""The two baselines celld is compared with, on the same simulated network.

Owns: how a plain pull-through cache and Spegel fetch an image, as the simulator
models them.
Never: uses celld's protocol objects: a baseline is what the world looks like without
celld.

- `CentralOnly`: every cell pulls every layer from the central registry. When the
  central registry lacks a layer it is a pull-through cache (distribution's proxy
  mode): each concurrent miss makes its own upstream request, streamed through the
  central registry, and later requests are served from its cache once one completes.
- `Spegel`: a cell asks for providers of each layer (modelled generously as one round
  trip to a directory, where Spegel walks a Kademlia DHT); a provider is a cell that
  has pulled the *whole image* (Spegel advertises only then). With a provider it takes
  the whole layer from that one peer (Spegel never splits a layer across peers);
  without one it goes to the origin (the central registry if it has the image, else
  the upstream). Cells that start together therefore all go to the origin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from simulations.model.flows import Flow

if TYPE_CHECKING:
    from simulations.model.world import World

RETRY_S = 1.0


class _Baseline:
    """What a baseline ignores: cells' datagrams (it has none) and membership news."""

    def __init__(self, world: World) -> None:
        self.w = world

    def on_crash(self, cell: int) -> None:
        pass

    def receive(self, cell: int, sender: str, msg: object) -> None:
        pass

    def member_changed(self, observer: int, member: int, state: str) -> None:
        pass

    def summary(self) -> dict[str, int]:
        return {}


class CentralOnly(_Baseline):
    """Every cell pulls from the central registry (a plain pull-through cache)."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.cached = [world.sc.central.has_image] * len(world.sc.layers)

    def start(self, cell: int) -> None:
        for layer in range(len(self.w.sc.layers)):
            self._request((cell, layer))

    def _request(self, arg: tuple[int, int]) -> None:
        cell, layer = arg
        w = self.w
        if not w.is_live(cell):
            return
        delay = w.net.latency(cell, w.central)
        if not self.cached[layer]:
            # the miss costs the central registry a round trip to the upstream first
            delay += 2 * w.net.latency(w.central, w.upstream)
        w.engine.call_at(w.engine.now + delay, self._serve, arg)

    def _serve(self, arg: tuple[int, int]) -> None:
        cell, layer = arg
        w = self.w
        if not w.is_live(cell):
            return
        size = w.sc.layers[layer]
        if self.cached[layer]:
            w.net.transfer(w.central, cell, size, self._done, tag=arg)
        else:
            w.net.transfer(w.upstream, cell, size, self._done, tag=arg, via=w.central)

    def _done(self, flow: Flow, ok: bool) -> None:
        w = self.w
        w.account(flow, ok)
        cell, layer = flow.tag
        if ok:
            self.cached[layer] = True
            w.layer_complete(cell, layer)
        elif w.is_live(cell):
            w.engine.call_at(w.engine.now + RETRY_S, self._request, flow.tag)


class Spegel(_Baseline):
    """Advertise a layer only after the whole image is pulled; one peer per layer."""

    def __init__(self, world: World) -> None:
        super().__init__(world)
        self.rng = world.rng("spegel")
        self.providers: list[list[int]] = [[] for _ in world.sc.layers]
        self.origin = world.central if world.sc.central.has_image else world.upstream

    def start(self, cell: int) -> None:
        for layer in range(len(self.w.sc.layers)):
            self._lookup((cell, layer))

    def on_crash(self, cell: int) -> None:
        for p in self.providers:
            if cell in p:
                p.remove(cell)

    def _lookup(self, arg: tuple[int, int]) -> None:
        cell, _ = arg
        w = self.w
        if not w.is_live(cell):
            return
        peer = self.rng.randrange(w.n_initial)
        rtt = w.net.latency(cell, peer) + w.net.latency(peer, cell)
        w.engine.call_at(w.engine.now + rtt, self._fetch, arg)

    def _fetch(self, arg: tuple[int, int]) -> None:
        cell, layer = arg
        w = self.w
        if not w.is_live(cell):
            return
        live = [p for p in self.providers[layer] if w.is_live(p) and w.net.reachable(p, cell)]
        src = live[self.rng.randrange(len(live))] if live else self.origin
        delay = w.net.latency(cell, src)
        w.engine.call_at(w.engine.now + delay, self._begin, (cell, layer, src))

    def _begin(self, arg: tuple[int, int, int]) -> None:
        cell, layer, src = arg
        if self.w.is_live(cell):
            self.w.net.transfer(src, cell, self.w.sc.layers[layer], self._done, tag=arg)

    def _done(self, flow: Flow, ok: bool) -> None:
        w = self.w
        w.account(flow, ok)
        cell, layer, _ = flow.tag
        if ok:
            if w.layer_complete(cell, layer):
                for p in self.providers:
                    p.append(cell)
        elif w.is_live(cell):
            w.engine.call_at(w.engine.now + RETRY_S, self._lookup, (cell, layer))
