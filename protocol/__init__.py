"""celld protocol: pure, sans-IO state machines and parsers.

Nothing here reads a socket, a file or a clock: every function takes `now`
and bytes/events and returns events/bytes, so the daemon and the simulator
run the same code.
"""
