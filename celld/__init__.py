"""celld: the cell daemon, trio I/O around protocol/."""

__version__ = "0.1.0"
