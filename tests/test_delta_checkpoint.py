"""Delta checkpoints (sparse_rl_optim.deltas.checkpoint) and their command-line tool (deltas.cli).

A few random bf16/fp32/fp16 tensors (never zero) change sparsely step by step (1% of the elements by
one ulp plus a few large changes; one step changes nothing, one leaves a tensor alone) and every step
is saved with ``anchor_every=3``; a copy of the tensors is kept at every saved step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparse_rl_optim.deltas import checkpoint as checkpoint_module
from sparse_rl_optim.deltas.checkpoint import (
    MANIFEST_NAME,
    CheckpointError,
    DeltaCheckpointWriter,
    read_manifest,
    rebuild,
    saved_steps,
)
from sparse_rl_optim.deltas.cli import main
from sparse_rl_optim.deltas.packet import PacketError

STEPS = list(range(0, 50, 5))  # 10 saves: packets 1..10, anchors 1, 4, 7, 10
_INT = {2: torch.int16, 4: torch.int32}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().cpu().contiguous().view(_INT[tensor.element_size()])


def _assert_bit_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(actual) == list(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert torch.equal(_bits(actual[name]), _bits(tensor)), name


def _make_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def nonzero(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        magnitude = torch.rand(shape, generator=generator) + 0.25
        sign = torch.randint(0, 2, shape, generator=generator) * 2 - 1
        return (magnitude * sign).to(dtype)

    return {
        "layer.weight": nonzero((48, 70), torch.bfloat16),
        "layer.bias": nonzero((70,), torch.float32),
        "head.weight": nonzero((33, 17), torch.float16),
        "norm.scale": nonzero((5,), torch.bfloat16),
    }


def _perturb(tensors: dict[str, torch.Tensor], generator: torch.Generator, skip: tuple[str, ...] = ()) -> None:
    """In place: 1% of the elements (at least one) one ulp further from zero, and 2 set to large values."""
    for name, tensor in tensors.items():
        if name in skip:
            continue
        numel = tensor.numel()
        bits = tensor.view(-1).view(_INT[tensor.element_size()])
        bits[torch.randperm(numel, generator=generator)[: max(1, numel // 100)]] += 1
        large = torch.randperm(numel, generator=generator)[:2]
        tensor.view(-1)[large] = (torch.rand(2, generator=generator) * 100 + 2).to(tensor.dtype)


def _write_run(
    directory: Path, tensors: dict[str, torch.Tensor], steps: list[int], seed: int = 1, **kwargs
) -> dict[int, dict[str, torch.Tensor]]:
    """Save ``steps``, perturbing between saves; returns a copy of the tensors at each step."""
    generator = torch.Generator().manual_seed(seed)
    writer = DeltaCheckpointWriter(directory, tensors, anchor_every=3, **kwargs)
    copies = {}
    for index, step in enumerate(steps):
        if index and index != 4:  # at index 4 nothing changes: an empty delta
            _perturb(tensors, generator, skip=("norm.scale",) if index == 2 else ())
        writer.save(step)
        copies[step] = {name: t.clone() for name, t in tensors.items()}
    return copies


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, torch.Tensor]]]:
    directory = tmp_path_factory.mktemp("checkpoint") / "run"
    return directory, _write_run(directory, _make_tensors(), STEPS)


def _copy(saved: tuple[Path, dict], tmp_path: Path) -> Path:
    directory = tmp_path / "copy"
    shutil.copytree(saved[0], directory)
    return directory


def test_rebuild_every_saved_step_bit_exact(saved):
    directory, copies = saved
    assert saved_steps(directory) == STEPS
    for step in STEPS:
        _assert_bit_equal(rebuild(directory, step), copies[step])
    _assert_bit_equal(rebuild(directory), copies[STEPS[-1]])  # default: the last saved step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rebuild_on_cuda(saved):
    directory, copies = saved
    for step in (STEPS[2], STEPS[-1]):
        state = rebuild(directory, step, device="cuda")
        assert all(t.is_cuda for t in state.values())
        _assert_bit_equal(state, copies[step])


def test_manifest_entries(saved):
    directory, copies = saved
    manifest = read_manifest(directory)
    assert manifest["format"] == "sparse_rl_optim.delta_checkpoint" and manifest["version"] == 1
    assert manifest["tensors"]["layer.weight"] == {"shape": [48, 70], "dtype": "bfloat16"}
    packets = manifest["packets"]
    assert [e["sequence"] for e in packets] == list(range(1, 11))
    assert [e["step"] for e in packets] == STEPS
    assert "".join(e["kind"][0] for e in packets) == "addaddadda"
    total = sum(t.numel() for t in copies[0].values())
    for index, entry in enumerate(packets):
        path = directory / entry["file"]
        assert entry["file"] == f"packet-{entry['sequence']:08d}.safetensors"
        assert entry["bytes"] == path.stat().st_size
        assert entry["sha256"] == checkpoint_module._sha256(path)
        if entry["kind"] == "anchor":
            assert entry["follows"] is None
            assert (entry["tensors_changed"], entry["elements_changed"]) == (4, total)
        else:
            assert entry["follows"] == entry["sequence"] - 1
            before, after = copies[STEPS[index - 1]], copies[entry["step"]]
            changed = {name: int((_bits(before[name]) != _bits(after[name])).sum()) for name in after}
            assert entry["tensors_changed"] == sum(1 for n in changed.values() if n)
            assert entry["elements_changed"] == sum(changed.values())
    assert packets[4]["elements_changed"] == 0 and packets[4]["tensors_changed"] == 0  # the step with no change
    assert packets[2]["tensors_changed"] == 3  # norm.scale left alone
    anchor_bytes = max(e["bytes"] for e in packets if e["kind"] == "anchor")
    assert all(e["bytes"] < anchor_bytes / 2 for e in packets if e["kind"] == "delta")
    assert not list(directory.glob("*.tmp"))


def test_altered_file_is_refused(saved, tmp_path):
    copies = saved[1]
    directory = _copy(saved, tmp_path)
    path = directory / "packet-00000006.safetensors"  # a delta with changes (anchors: 1, 4, 7, 10; 5 is empty)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"packet-00000006\.safetensors.*altered"):
        rebuild(directory, STEPS[5])
    _assert_bit_equal(rebuild(directory, STEPS[4]), copies[STEPS[4]])  # anchor 4 and delta 5
    _assert_bit_equal(rebuild(directory, STEPS[6]), copies[STEPS[6]])  # anchor 7 alone
    header = directory / "packet-00000005.safetensors"  # the empty delta: its header altered
    data = bytearray(header.read_bytes())
    data[20] ^= 0x01
    header.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"packet-00000005\.safetensors.*altered"):
        rebuild(directory, STEPS[4])


def test_altered_payload_behind_a_matching_sha256_is_refused_by_the_receiver(saved, tmp_path):
    """If the manifest's SHA-256 is rewritten to match an altered file, the packet's own CRCs still catch it."""
    directory = _copy(saved, tmp_path)
    path = directory / "packet-00000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last byte of the tensor data
    path.write_bytes(bytes(data))
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["packets"][1]["sha256"] = checkpoint_module._sha256(path)
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PacketError, match="corrupted"):
        rebuild(directory, STEPS[1])


def test_missing_file_is_refused(saved, tmp_path):
    copies = saved[1]
    directory = _copy(saved, tmp_path)
    (directory / "packet-00000002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"packet-00000002\.safetensors.*missing"):
        rebuild(directory, STEPS[2])
    _assert_bit_equal(rebuild(directory, STEPS[0]), copies[STEPS[0]])


def test_unknown_step_lists_the_saved_steps(saved):
    with pytest.raises(
        CheckpointError, match=r"step 7 was not saved; saved steps: 0, 5, 10, 15, 20, 25, 30, 35, 40, 45"
    ):
        rebuild(saved[0], 7)


def test_writer_refuses_another_run_and_resume_continues_with_an_anchor(tmp_path):
    directory = tmp_path / "run"
    tensors = _make_tensors(seed=3)
    copies = _write_run(directory, tensors, [1, 2])  # packets 1 (anchor), 2 (delta)
    run_id = read_manifest(directory)["run_id"]
    with pytest.raises(CheckpointError, match="resume=True"):
        DeltaCheckpointWriter(directory, tensors)
    other = dict(tensors, extra=torch.ones(3))
    with pytest.raises(CheckpointError, match="other tensors"):
        DeltaCheckpointWriter(directory, other, resume=True)

    writer = DeltaCheckpointWriter(directory, tensors, anchor_every=3, resume=True)
    with pytest.raises(ValueError, match="not after the last saved step 2"):
        writer.save(2)
    generator = torch.Generator().manual_seed(9)
    for step in (3, 4, 5):
        _perturb(tensors, generator)
        entry = writer.save(step)
        copies[step] = {name: t.clone() for name, t in tensors.items()}
        if step == 3:
            assert (entry["sequence"], entry["kind"], entry["follows"]) == (3, "anchor", None)
    manifest = read_manifest(directory)
    assert manifest["run_id"] == run_id and manifest["resumed_at"] == [3]
    assert [(e["sequence"], e["kind"]) for e in manifest["packets"]] == [
        (1, "anchor"),
        (2, "delta"),
        (3, "anchor"),
        (4, "delta"),
        (5, "delta"),
    ]
    for step, expected in copies.items():
        _assert_bit_equal(rebuild(directory, step), expected)
    with pytest.raises(TypeError):
        writer.save(6.0)
    with pytest.raises(ValueError, match="power of two"):
        DeltaCheckpointWriter(tmp_path / "other", tensors, tile_size=48)


def test_manifest_survives_a_crash(tmp_path, monkeypatch):
    directory = tmp_path / "run"
    tensors = _make_tensors(seed=4)
    copies = _write_run(directory, tensors, [10, 20])
    # A crash while the manifest was being written leaves a partial temporary file: it is ignored.
    (directory / (MANIFEST_NAME + ".tmp")).write_text('{"format": "sparse_rl_optim.delta_checkp')
    assert saved_steps(directory) == [10, 20]

    writer = DeltaCheckpointWriter(directory, tensors, anchor_every=3, resume=True)
    before = (directory / MANIFEST_NAME).read_bytes()
    real_replace = os.replace

    def crash_on_manifest(source, destination):
        if Path(destination).name == MANIFEST_NAME:
            raise OSError("simulated crash before the manifest is renamed into place")
        real_replace(source, destination)

    generator = torch.Generator().manual_seed(5)
    _perturb(tensors, generator)
    monkeypatch.setattr(os, "replace", crash_on_manifest)
    with pytest.raises(OSError, match="simulated crash"):
        writer.save(30)
    monkeypatch.setattr(os, "replace", real_replace)
    assert (directory / MANIFEST_NAME).read_bytes() == before
    assert saved_steps(directory) == [10, 20]  # the old manifest, whole
    assert (directory / "packet-00000003.safetensors").exists()  # the packet the manifest does not name
    for step, expected in copies.items():
        _assert_bit_equal(rebuild(directory, step), expected)

    # A failure inside the packet write: the manifest is untouched and the next save starts afresh.
    def failing_save(packet, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "save_packet", failing_save)
    with pytest.raises(OSError, match="disk full"):
        writer.save(30)
    monkeypatch.undo()
    assert saved_steps(directory) == [10, 20]

    entry = writer.save(30)  # the same writer goes on: the sequence the manifest lacks, as an anchor
    assert (entry["sequence"], entry["kind"]) == (3, "anchor")
    copies[30] = {name: t.clone() for name, t in tensors.items()}
    _perturb(tensors, generator)
    assert writer.save(40)["kind"] == "delta"
    copies[40] = {name: t.clone() for name, t in tensors.items()}
    for step, expected in copies.items():
        _assert_bit_equal(rebuild(directory, step), expected)


def test_cli_rebuild_and_inspect(saved, tmp_path, capsys):
    from safetensors.torch import load_file

    directory, copies = saved
    out = tmp_path / "step20.safetensors"
    assert main(["rebuild", str(directory), "--step", "20", "--out", str(out)]) == 0
    assert "step 20: 4 tensors" in capsys.readouterr().out
    _assert_bit_equal({name: load_file(out)[name] for name in copies[20]}, copies[20])
    last = tmp_path / "last.safetensors"
    assert main(["rebuild", str(directory), "--out", str(last)]) == 0
    _assert_bit_equal({name: load_file(last)[name] for name in copies[45]}, copies[45])

    assert main(["inspect", str(directory)]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [(int(r[0]), int(r[1]), r[2]) for r in rows] == [
        (i + 1, step, "anchor" if i % 3 == 0 else "delta") for i, step in enumerate(STEPS)
    ]
    assert "packets: 10 (4 anchors, 6 deltas)" in text
    assert "delta bytes / anchor bytes" in text and "mean delta / mean anchor" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "required"),
        (["rebuild", "{dir}"], "--out"),
        (["rebuild", "{dir}", "--step", "x", "--out", "o.safetensors"], "invalid int value"),
        (
            ["rebuild", "{dir}", "--step", "7", "--out", "{tmp}/o.safetensors"],
            "step 7 was not saved; saved steps: 0, 5",
        ),
        (["rebuild", "{dir}", "--out", "{tmp}/no/such/o.safetensors"], "does not exist"),
        (["inspect", "{tmp}/nowhere"], "no such directory"),
        (["inspect", "{tmp}"], "no such manifest"),
        (["compress", "{dir}"], "invalid choice"),
    ],
)
def test_cli_errors(saved, tmp_path, capsys, argv, message):
    argv = [arg.format(dir=saved[0], tmp=tmp_path) for arg in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script(saved, tmp_path):
    script = Path(sys.executable).parent / "sparse-rl-optim-deltas"
    if not script.exists():
        pytest.skip("the console script is not installed next to this interpreter")
    directory, copies = saved
    out = tmp_path / "step35.safetensors"
    result = subprocess.run(
        [str(script), "rebuild", str(directory), "--step", "35", "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    _assert_bit_equal({name: load_file(out)[name] for name in copies[35]}, copies[35])


def test_cli_refuses_to_overwrite_the_checkpoint_it_reads(tmp_path):
    from sparse_rl_optim.deltas.checkpoint import DeltaCheckpointWriter
    from sparse_rl_optim.deltas.cli import main

    writer = DeltaCheckpointWriter(tmp_path / "ckpt", {"w": torch.randn(64)})
    writer.save(0)
    for name in ("manifest.json", "packet-00000001.safetensors"):
        with pytest.raises(SystemExit) as exit_info:
            main(["rebuild", str(tmp_path / "ckpt"), "--out", str(tmp_path / "ckpt" / name)])
        assert exit_info.value.code == 2
    manifest = json.loads((tmp_path / "ckpt" / "manifest.json").read_text())
    manifest["packets"][0]["step"] = None
    (tmp_path / "ckpt" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="must be integers"):
        read_manifest(tmp_path / "ckpt")
