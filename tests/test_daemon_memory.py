"""The daemon's start-up heap is frozen out of the cyclic collector's sight."""

from __future__ import annotations

import gc
from pathlib import Path

import trio

from celld.config import from_dict
from celld.daemon import serve
from tests.support.procs import free_port


async def test_start_up_objects_are_frozen_so_full_collections_stay_short(tmp_path: Path) -> None:
    # A full collection scanned every object start-up made (the store's index,
    # every module): 13-25 ms measured, in the middle of whatever pull was on.
    config = from_dict(
        {
            "cell": {"data_dir": str(tmp_path / "data")},
            "mirror": {"listen": f"127.0.0.1:{free_port()}"},
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        }
    )
    gc.unfreeze()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, config)
            assert gc.get_freeze_count() > 10_000
            nursery.cancel_scope.cancel()
    finally:
        gc.unfreeze()
