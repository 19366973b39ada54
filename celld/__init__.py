"""celld: the cell daemon, trio I/O around protocol/."""
