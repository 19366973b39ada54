"""The simulator's clock runs callbacks in time order, ties in the order they were set."""

from __future__ import annotations

from simulations.model.engine import Engine


def test_callbacks_run_in_time_order_and_ties_in_scheduling_order() -> None:
    engine = Engine()
    ran: list[tuple[float, str]] = []

    def note(name: str) -> None:
        ran.append((engine.now, name))
        if name == "b":  # scheduled while 1.0 runs, for 1.0 and for the past
            engine.call_at(1.0, note, "b-now")
            engine.call_at(0.5, note, "b-past")

    for when, name in [(2.0, "d"), (1.0, "a"), (1.0, "b"), (0.0, "first"), (1.0, "c")]:
        engine.call_at(when, note, name)
    assert engine.pending() == 5
    engine.run(1.5)
    assert ran == [
        (0.0, "first"),
        (1.0, "a"),
        (1.0, "b"),
        (1.0, "c"),
        (1.0, "b-now"),
        (1.0, "b-past"),
    ]
    assert engine.now == 1.5 and engine.pending() == 1 and engine.events_run == 6
    engine.run(10.0)
    assert ran[-1] == (2.0, "d") and engine.pending() == 0
