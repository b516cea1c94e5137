"""``sparse-rl-optim-deltas``: rebuild and inspect delta checkpoints (:mod:`.checkpoint`).

::

    sparse-rl-optim-deltas rebuild DIR [--step N] --out OUT.safetensors [--device cpu]
    sparse-rl-optim-deltas inspect DIR

``rebuild`` writes the tensors as saved at step ``N`` (default: the last saved step) to one
safetensors file, after verifying every file it reads (see :func:`.checkpoint.rebuild`). ``inspect``
prints one row per packet (sequence, step, kind, file bytes, tensors and elements changed), the
totals, and how the delta packets' bytes compare with the anchors'.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-rl-optim-deltas",
        description="Rebuild and inspect delta checkpoints (a manifest.json plus packet-*.safetensors files).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    rebuild = commands.add_parser(
        "rebuild",
        help="write the weights of a saved step to a safetensors file",
        description="Rebuild the weights of a saved step (an anchor plus its deltas, every file verified) and "
        "write them to a safetensors file.",
    )
    rebuild.add_argument("directory", metavar="DIR", help="the checkpoint directory")
    rebuild.add_argument("--step", type=int, default=None, metavar="N", help="the saved step (default: the last)")
    rebuild.add_argument("--out", required=True, metavar="OUT.safetensors", help="the file to write")
    rebuild.add_argument("--device", default="cpu", help="where to rebuild the tensors (default: cpu)")
    inspect = commands.add_parser(
        "inspect",
        help="print a table of the saved packets",
        description="Print one row per packet, the totals, and the ratio of delta bytes to anchor bytes.",
    )
    inspect.add_argument("directory", metavar="DIR", help="the checkpoint directory")
    return parser


def _human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _inspect(directory: str) -> None:
    from sparse_rl_optim.deltas.checkpoint import read_manifest

    manifest = read_manifest(directory)
    packets: list[dict[str, Any]] = manifest["packets"]
    tensors = manifest["tensors"]
    elements = 0
    for info in tensors.values():
        count = 1
        for size in info["shape"]:
            count *= size
        elements += count
    print(f"{directory}: run {manifest.get('run_id', '?')}, {len(tensors)} tensors, {elements} elements")
    header = (
        f"{'sequence':>8}  {'step':>8}  {'kind':<6}  {'bytes':>12}  {'tensors':>7}  {'elements':>12}  {'changed':>8}"
    )
    print(header)
    print("-" * len(header))
    for entry in packets:
        share = entry["elements_changed"] / elements if elements else 0.0
        print(
            f"{entry['sequence']:>8}  {entry['step']:>8}  {entry['kind']:<6}  {entry['bytes']:>12}  "
            f"{entry['tensors_changed']:>7}  {entry['elements_changed']:>12}  {share:>8.3%}"
        )
    print("-" * len(header))
    anchors = [entry for entry in packets if entry["kind"] == "anchor"]
    deltas = [entry for entry in packets if entry["kind"] == "delta"]
    anchor_bytes = sum(entry["bytes"] for entry in anchors)
    delta_bytes = sum(entry["bytes"] for entry in deltas)
    total = anchor_bytes + delta_bytes
    print(f"packets: {len(packets)} ({len(anchors)} anchors, {len(deltas)} deltas), {total} bytes ({_human(total)})")
    print(f"anchors: {anchor_bytes} bytes ({_human(anchor_bytes)})")
    print(f"deltas:  {delta_bytes} bytes ({_human(delta_bytes)})")
    if anchors and deltas:
        mean_ratio = (delta_bytes / len(deltas)) / (anchor_bytes / len(anchors))
        print(f"delta bytes / anchor bytes: {delta_bytes / anchor_bytes:.4f} in all")
        print(f"mean delta / mean anchor:   {mean_ratio:.4f}")
    else:
        print("delta bytes / anchor bytes: n/a (needs at least one anchor and one delta)")


def _rebuild(directory: str, step: int | None, out: str, device: str) -> None:
    from safetensors.torch import save_file

    from sparse_rl_optim.deltas.checkpoint import read_manifest, rebuild

    state = rebuild(directory, step, device=device)
    if step is None:
        step = read_manifest(directory)["packets"][-1]["step"]
    save_file({name: t.contiguous() for name, t in state.items()}, out, metadata={"step": str(step)})
    elements = sum(t.numel() for t in state.values())
    print(f"step {step}: {len(state)} tensors, {elements} elements -> {out} ({_human(os.path.getsize(out))})")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns 0, or exits with status 2
    and a usage message on a bad argument, an unreadable checkpoint or a failed verification."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not Path(args.directory).is_dir():
        parser.error(f"{args.directory}: no such directory")
    from sparse_rl_optim.deltas.checkpoint import CheckpointError
    from sparse_rl_optim.deltas.packet import PacketError

    try:
        if args.command == "rebuild":
            out = Path(args.out)
            if not out.parent.is_dir():
                parser.error(f"--out {args.out}: the directory {out.parent} does not exist")
            if out.resolve().parent == Path(args.directory).resolve() and (
                out.name == "manifest.json" or out.name.startswith("packet-")
            ):
                parser.error(f"--out {args.out} would overwrite a file of the checkpoint it reads")
            _rebuild(args.directory, args.step, args.out, args.device)
        else:
            _inspect(args.directory)
    except (CheckpointError, PacketError) as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
