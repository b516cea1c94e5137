"""Shared set-up for the torchrun workers: the gloo process group, a CPU device mesh, results out."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist


def start(description: str) -> tuple[argparse.Namespace, Any]:
    """Parse ``--out`` (and nothing else), start gloo, return ``(args, mesh)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenario", default="all")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.set_num_threads(1)
    return args, mesh


def rank() -> int:
    return dist.get_rank()


def write_result(out: Path, name: str, payload: dict[str, Any]) -> None:
    """Rank 0 writes ``<out>/<name>.json``."""
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(payload, indent=1))


def finish(exit_code: int = 0) -> NoReturn:
    """Shut the process group down and exit, skipping the interpreter's teardown: now and then
    gloo's worker threads abort it ("terminate called without an active exception", SIGABRT) after
    everything was checked, written and shut down."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
