"""Delta checkpoints: a directory of delta packets (one safetensors file each) plus a manifest, from
which the weights of any saved step are rebuilt bit-exact.

Layout of a checkpoint directory::

    manifest.json                  # format, version, run id, tensors, one entry per packet
    packet-00000001.safetensors    # an anchor: every tensor in full
    packet-00000002.safetensors    # a delta: what changed since packet 1
    ...

:class:`DeltaCheckpointWriter` wraps a :class:`~sparse_rl_optim.deltas.packet.DeltaSender`: each
:meth:`~DeltaCheckpointWriter.save` writes the next packet (an anchor every ``anchor_every`` packets,
deltas in between) and appends its entry to the manifest. Files are written to a temporary name,
flushed to disk and renamed into place (packet first, manifest last), so a crash at any point leaves
the previous manifest whole and every packet it names intact; a packet file the manifest does not
name yet is ignored and later overwritten.

:func:`rebuild` returns the state at a saved step: the latest anchor at or before it, then every
delta up to it, applied through a :class:`~sparse_rl_optim.deltas.packet.DeltaReceiver` (which
checks the sequence, each change's CRC and each tensor's checksum before and after). Before loading
anything it checks that every file it needs exists and has the SHA-256 the manifest recorded.

The command-line tool ``sparse-rl-optim-deltas`` (:mod:`.cli`) rebuilds a step into a safetensors
file and prints a table of the packets.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparse_rl_optim.deltas.packet import DeltaPacket, DeltaReceiver, DeltaSender, load_packet, save_packet
from sparse_rl_optim.tiles import DEFAULT_TILE_SIZE, check_tile_size

__all__ = [
    "FORMAT",
    "MANIFEST_NAME",
    "VERSION",
    "CheckpointError",
    "DeltaCheckpointWriter",
    "read_manifest",
    "rebuild",
    "saved_steps",
]

#: The ``format`` field of a manifest, and the version this module writes and reads.
FORMAT = "sparse_rl_optim.delta_checkpoint"
VERSION = 1
MANIFEST_NAME = "manifest.json"
_PACKET_GLOB = "packet-*.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be written or read as asked: a foreign or malformed
    manifest, a missing or altered packet file, an unknown step."""


def _packet_file(sequence: int) -> str:
    return f"packet-{sequence:08d}.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, flushed and then
    renamed over ``path`` (``os.replace``): readers see the old file or the new one, never a part."""
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    _fsync_directory(path.parent)


def read_manifest(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the checkpoint in ``directory``. Checks that it is a JSON object of this
    format and a version this module reads, whose packet entries have the expected fields, follow
    each other in sequence (a delta follows the packet before it) and have increasing steps; raises
    :class:`CheckpointError` otherwise (or if there is no manifest)."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(f"{path}: no such manifest (is {directory} a delta checkpoint directory?)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: cannot read the manifest: {error}") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a delta checkpoint manifest (format is not {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise CheckpointError(f"{path}: manifest version {manifest.get('version')!r}; this version reads {VERSION}")
    packets = manifest.get("packets")
    if not isinstance(packets, list) or not isinstance(manifest.get("tensors"), dict):
        raise CheckpointError(f"{path}: malformed manifest (no packets list or tensors table)")
    previous: dict[str, Any] | None = None
    for index, entry in enumerate(packets):
        missing = [key for key in ("sequence", "follows", "step", "file", "kind", "sha256") if key not in entry]
        if missing:
            raise CheckpointError(f"{path}: packet entry {index} lacks {missing}")
        integers = [entry["sequence"], entry["step"]] + ([entry["follows"]] if entry["follows"] is not None else [])
        if not all(isinstance(value, int) and not isinstance(value, bool) for value in integers) or not isinstance(
            entry["file"], str
        ):
            raise CheckpointError(f"{path}: packet entry {index}: sequence, step and follows must be integers")
        if entry["kind"] not in ("anchor", "delta") or (entry["kind"] == "anchor") != (entry["follows"] is None):
            raise CheckpointError(f"{path}: packet {entry['sequence']}: kind {entry['kind']!r} and follows disagree")
        if os.path.basename(entry["file"]) != entry["file"]:
            raise CheckpointError(f"{path}: packet {entry['sequence']}: file {entry['file']!r} is not a plain name")
        if index == 0 and entry["kind"] != "anchor":
            raise CheckpointError(f"{path}: the first packet ({entry['sequence']}) is not an anchor")
        if previous is not None:
            if entry["sequence"] <= previous["sequence"]:
                raise CheckpointError(f"{path}: packet {entry['sequence']} comes after packet {previous['sequence']}")
            if entry["kind"] == "delta" and entry["follows"] != previous["sequence"]:
                raise CheckpointError(
                    f"{path}: packet {entry['sequence']} follows {entry['follows']}, but the entry before it "
                    f"is packet {previous['sequence']}"
                )
            if entry["step"] <= previous["step"]:
                raise CheckpointError(f"{path}: step {entry['step']} comes after step {previous['step']}")
        previous = entry
    return manifest


def saved_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps saved in the checkpoint in ``directory``, in order."""
    return [entry["step"] for entry in read_manifest(directory)["packets"]]


def _describe_steps(steps: list[int]) -> str:
    if not steps:
        return "none"
    if len(steps) <= 12:
        return ", ".join(map(str, steps))
    return f"{', '.join(map(str, steps[:5]))}, ..., {', '.join(map(str, steps[-5:]))} ({len(steps)} in all)"


def _packet_counts(packet: DeltaPacket) -> tuple[int, int]:
    """Tensors and elements a packet changes (all of them, carried in full, for an anchor)."""
    if packet.is_anchor:
        return len(packet.full), sum(t.numel() for t in packet.full.values())
    return len(packet.changes), sum(c.count for c in packet.changes.values())


class DeltaCheckpointWriter:
    """Saves the named tensors (a model's parameters, or a dict of tensors that the caller keeps
    updating in place) as a chain of delta packets in ``directory``, one per :meth:`save`.

    ``anchor_every``: every this many packets an anchor (the whole state) instead of a delta, which
    bounds how many deltas a rebuild applies (``None``: only the first packet is one);
    ``encoding`` (``"tiles"``, ``"sparse"`` or ``"auto"``) and ``tile_size``: how deltas are encoded
    (:mod:`.encoding`).

    A directory that already holds a checkpoint (a manifest or packet files) is refused unless
    ``resume=True``: then the tensors must have the names, shapes and dtypes the manifest records,
    the sequence continues from the manifest's last packet, the first packet written is an anchor
    (this writer has no copy of the state that packet brought), and steps must keep increasing.
    With ``resume=True`` and no manifest, a new checkpoint is started.

    If writing a packet or the manifest fails, the exception propagates, the manifest keeps its
    previous content, and the next :meth:`save` writes an anchor with the next unused sequence.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        tensors: nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
        *,
        anchor_every: int | None = 50,
        encoding: str = "auto",
        tile_size: int = DEFAULT_TILE_SIZE,
        resume: bool = False,
    ) -> None:
        self.directory = Path(directory)
        check_tile_size(tile_size)  # DeltaSender would only notice at the first delta
        self.sender = DeltaSender(tensors, encoding=encoding, tile_size=tile_size, anchor_every=anchor_every)
        table = {
            name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
            for name, t in self.sender.tensors.items()
        }
        manifest_path = self.directory / MANIFEST_NAME
        existing = manifest_path.exists() or (self.directory.is_dir() and any(self.directory.glob(_PACKET_GLOB)))
        if existing and not resume:
            raise CheckpointError(
                f"{self.directory} already holds a delta checkpoint (a manifest or packet files); pass "
                "resume=True to continue it, or choose another directory"
            )
        self._force_anchor = False
        if resume and manifest_path.exists():
            manifest = read_manifest(self.directory)
            if manifest["tensors"] != table:
                names = sorted(set(manifest["tensors"]) ^ set(table)) or [
                    name for name in table if manifest["tensors"][name] != table[name]
                ]
                raise CheckpointError(
                    f"{manifest_path}: the checkpoint holds other tensors than this writer "
                    f"(names, shapes or dtypes differ: {names[:5]})"
                )
            if manifest["packets"]:
                self.sender.sequence = manifest["packets"][-1]["sequence"]
                manifest.setdefault("resumed_at", []).append(self.sender.sequence + 1)
                self._force_anchor = True
        else:
            manifest = {
                "format": FORMAT,
                "version": VERSION,
                "run_id": uuid.uuid4().hex,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "anchor_every": anchor_every,
                "encoding": encoding,
                "tile_size": tile_size,
                "tensors": table,
                "packets": [],
            }
        self.manifest: dict[str, Any] = manifest
        self.directory.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(manifest_path, self.manifest)

    @property
    def last_step(self) -> int | None:
        """The step of the last packet in the manifest (``None`` before the first)."""
        packets = self.manifest["packets"]
        return packets[-1]["step"] if packets else None

    def save(self, step: int, *, anchor: bool = False) -> dict[str, Any]:
        """Write the packet that brings the tensors' current values as ``step`` (an int greater than
        every step saved before; ``anchor=True`` forces a full anchor) and append its entry to the
        manifest. Returns the entry: ``sequence``, ``follows`` (``None`` for an anchor), ``step``,
        ``file``, ``kind`` (``"anchor"``/``"delta"``), ``bytes`` (file size), ``payload_bytes``
        (tensor bytes), ``sha256`` of the file, ``tensors_changed`` and ``elements_changed`` (for an
        anchor: every tensor and element, carried in full)."""
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(f"step {step} is not after the last saved step {self.last_step}")
        last_sequence = self.sender.sequence
        try:
            packet = self.sender.packet(step=step, anchor=anchor or self._force_anchor)
            name = _packet_file(packet.sequence)
            path = self.directory / name
            temporary = path.with_name(name + ".tmp")
            save_packet(packet, temporary)
            with open(temporary, "rb") as handle:
                os.fsync(handle.fileno())
            sha256 = _sha256(temporary)
            size = os.path.getsize(temporary)
            os.replace(temporary, path)
            tensors_changed, elements_changed = _packet_counts(packet)
            entry = {
                "sequence": packet.sequence,
                "follows": packet.follows,
                "step": step,
                "file": name,
                "kind": "anchor" if packet.is_anchor else "delta",
                "bytes": size,
                "payload_bytes": packet.nbytes(),
                "sha256": sha256,
                "tensors_changed": tensors_changed,
                "elements_changed": elements_changed,
            }
            self.manifest["packets"].append(entry)
            try:
                _write_json_atomically(self.directory / MANIFEST_NAME, self.manifest)
            except BaseException:
                self.manifest["packets"].pop()
                raise
        except BaseException:
            # The sender moved on to a packet the manifest does not record: restart the chain.
            self.sender.sequence = last_sequence
            self._force_anchor = True
            raise
        self._force_anchor = False
        return dict(entry)


def _check_file(directory: Path, entry: Mapping[str, Any]) -> Path:
    path = directory / entry["file"]
    if not path.is_file():
        raise CheckpointError(f"{path}: packet {entry['sequence']} (step {entry['step']}) is missing")
    digest = _sha256(path)
    if digest != entry["sha256"]:
        raise CheckpointError(
            f"{path}: packet {entry['sequence']} (step {entry['step']}) was altered: its SHA-256 is {digest}, "
            f"the manifest records {entry['sha256']}"
        )
    return path


def rebuild(
    directory: str | os.PathLike[str], step: int | None = None, *, device: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """The tensors as saved at ``step`` (default: the last saved step), bit-exact, on ``device``, in
    the order the writer had them.

    Verified: the manifest (:func:`read_manifest`); that ``step`` was saved (else
    :class:`CheckpointError` listing the saved steps); before loading anything, that every packet
    file needed (the latest anchor at or before ``step`` and the deltas after it up to ``step``)
    exists and has the SHA-256 the manifest records (else :class:`CheckpointError` naming the file);
    that each file holds the packet its entry describes; and, by the
    :class:`~sparse_rl_optim.deltas.packet.DeltaReceiver`, each packet's sequence, CRCs and the
    checksum of every tensor before and after each change
    (:class:`~sparse_rl_optim.deltas.packet.PacketError`).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    packets = manifest["packets"]
    steps = [entry["step"] for entry in packets]
    if not packets:
        raise CheckpointError(f"{directory}: the checkpoint holds no saved step yet")
    if step is None:
        target = len(packets) - 1
    else:
        if step not in steps:
            raise CheckpointError(f"{directory}: step {step} was not saved; saved steps: {_describe_steps(steps)}")
        target = steps.index(step)
    start = max(i for i in range(target + 1) if packets[i]["kind"] == "anchor")
    chain = packets[start : target + 1]
    paths = [_check_file(directory, entry) for entry in chain]

    state: dict[str, Tensor] = {}
    receiver: DeltaReceiver | None = None
    for entry, path in zip(chain, paths, strict=True):
        packet = load_packet(path)
        if (packet.sequence, packet.follows, packet.step) != (entry["sequence"], entry["follows"], entry["step"]):
            raise CheckpointError(
                f"{path}: holds packet {packet.sequence} (follows {packet.follows}, step {packet.step}), the "
                f"manifest expects packet {entry['sequence']} (follows {entry['follows']}, step {entry['step']})"
            )
        if receiver is None:
            order = [name for name in manifest["tensors"] if name in packet.full]
            order += [name for name in packet.full if name not in manifest["tensors"]]
            state = {
                name: torch.empty(packet.full[name].shape, dtype=packet.full[name].dtype, device=device)
                for name in order
            }
            receiver = DeltaReceiver(state)
        receiver.apply(packet)
    return state
