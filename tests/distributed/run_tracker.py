"""torchrun worker: PrecisionGateTracker's figures under FSDP2 and DDP equal a single-process run's.

Each scenario steps a sharded (or replicated) model and a plain copy of it in the same process with
the same gradients (fresh, non-zero, equal on every rank from a shared seed) and checks, on every
rank and for every step:

* the two models' weights are bitwise equal (so equal figures are what the tracker must report);
* every record of the sharded tracker equals the plain tracker's record, dict for dict;
* the plain tracker's per-param counts equal a naive bitwise diff of the full weights and its
  cumulative counts a diff against the reference weights (an oracle independent of the tracker);
* exactly one ``torch.distributed.all_reduce`` per step (and per ``mark_synced()``, per
  ``changed_since_sync``) where params are DTensors, none under DDP or for the plain tracker;
* ``mark_synced()``'s return value, ``changed_since_sync`` and the gathered ``changed_masks()`` equal
  the plain tracker's;
* an edit made outside the step on rank 1's shard only is named on both ranks; a weight becoming inf
  on rank 1's shard is counted on both ranks; rank 0 alone warns and streams ``jsonl_path``.

Scenarios: FSDP2 with ``torch.optim.SGD`` (bf16 and fp32 params, rows 5 and 1 that shard unevenly
or leave rank 1 empty, a module left unsharded, so plain params mix in), FSDP2 with
``sparse_rl_optim.RLSGD`` (stochastic rounding on the torch path; the Triton path in the
interpreter, where the step kernel reports local changed indices), and DDP with SGD.
"""

from __future__ import annotations

import copy
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from _common import finish, start, write_result
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from sparse_rl_optim import RLSGD, PrecisionGateTracker
from sparse_rl_optim.distributed import local_tensor

STEPS = 4
SYNC_BEFORE_STEP = 2  # mark_synced() before this step (0-based)
EDIT_BEFORE_STEP = 2  # an edit outside the step, on rank 1's shard only, before this step
EDITED = "layers.1.mlp.up_proj.weight"  # 5 rows: rank 0 holds rows 0-2, rank 1 rows 3-4
INF_STEP = STEPS - 1  # a gradient of inf in rank 1's shard at the last step
INF_PARAM = "embed_tokens.weight"


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(8, 8, bias=False)
        self.k_proj = nn.Linear(8, 4, bias=False)
        self.mlp = nn.ModuleDict({"up_proj": nn.Linear(8, 5), "down_proj": nn.Linear(5, 8)})


class Model(nn.Module):
    """Llama-like names (kinds and layers to group by); rows 5 (3 + 2 on 2 ranks) and 1 (rank 1
    holds nothing); an fp32 head (gate view through bf16); ``norm`` stays plain under FSDP2."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(5, 8)
        self.layers = nn.ModuleList([Block(), Block()])
        self.norm = nn.LayerNorm(8)
        self.score = nn.Linear(8, 1)
        self.lm_head = nn.Linear(8, 7, bias=False)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    model = Model().to(torch.bfloat16)
    model.lm_head.float()
    return model


def shard(model: nn.Module, mesh: Any) -> nn.Module:
    """FSDP2 on every module but ``norm`` (and not the root), so ``norm`` keeps plain params."""
    for module in (model.embed_tokens, *model.layers, model.score, model.lm_head):
        fully_shard(module, mesh=mesh)
    return model


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Full gate-view bits, computed independently of the package (a DTensor is gathered)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    tensor = tensor.detach()
    view = tensor if tensor.dtype == torch.bfloat16 else tensor.to(torch.bfloat16)
    return view.contiguous().view(torch.int16).clone()


def full_bits(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: bits(param) for name, param in model.named_parameters()}


def gradients(model: nn.Module, step: int) -> dict[str, torch.Tensor]:
    """Fresh non-zero full gradients, equal on every rank (a generator per step). Every other param
    gets small ones, which mostly fall under the precision gate (its references stay sparse)."""
    generator = torch.Generator().manual_seed(100 + step)
    grads = {}
    for position, (name, param) in enumerate(model.named_parameters()):
        grad = torch.randn(param.shape, generator=generator) * (0.05 if position % 2 else 0.003)
        grad = torch.where(grad == 0, torch.full_like(grad, 0.01), grad)
        if step == INF_STEP and name == INF_PARAM:
            grad[4, 2] = float("inf")  # row 4: on rank 1 under FSDP2
        grads[name] = grad.to(param.dtype)
    return grads


def set_gradients(model: nn.Module, full: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        grad = full[name.removeprefix("module.")]
        if isinstance(param, DTensor):  # this rank's shard, sliced locally (no communication)
            grad = distribute_tensor(grad, param.device_mesh, param.placements, src_data_rank=None)
        param.grad = grad.clone()


def differences(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """The keys of two records whose values differ, with both values (short failure messages)."""
    return {
        key: (ours.get(key), theirs.get(key)) for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)
    }


class AllReduceCounter:
    """Counts calls of ``torch.distributed.all_reduce`` (where ``sparse_rl_optim.distributed`` sends
    its sums), through both names torch exposes it under."""

    def __init__(self) -> None:
        self.calls = 0
        original = dist.all_reduce

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(*args, **kwargs)

        dist.all_reduce = counting
        c10d.all_reduce = counting

    def count(self, action: Callable[[], Any]) -> tuple[Any, int]:
        before = self.calls
        result = action()
        return result, self.calls - before


def step_recording_warnings(optimizer: torch.optim.Optimizer) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        optimizer.step()
    return [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def edit_outside_step(model: nn.Module, sharded: bool) -> None:
    """Row 3, column 0 of ``EDITED``: rank 1's first local row under FSDP2, row 3 of the full copy."""
    param = dict(model.named_parameters())[EDITED]
    with torch.no_grad():
        if sharded:
            if dist.get_rank() == 1:
                local_tensor(param)[0, 0] += 0.5
        else:
            param[3, 0] += 0.5


def run_scenario(
    name: str,
    model: nn.Module,
    plain: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    counter: AllReduceCounter,
    out: Path,
    *,
    sharded: bool,
) -> dict[str, Any]:
    rank = dist.get_rank()
    tracked = model.module if isinstance(model, DistributedDataParallel) else model
    optimizer, plain_optimizer = make_optimizer(model), make_optimizer(plain)
    stream = out / f"{name}_rank{rank}.jsonl"  # only rank 0's is written
    out.mkdir(parents=True, exist_ok=True)
    tracker = PrecisionGateTracker(tracked, jsonl_path=stream).attach(optimizer)
    plain_tracker = PrecisionGateTracker(plain).attach(plain_optimizer)
    expected_total = sum(p.numel() for p in plain.parameters())
    reference = full_bits(plain)
    sync_point = dict(reference)
    reduces: dict[str, list[int]] = {"step": [], "plain_step": [], "mark_synced": [], "changed_since_sync": []}
    warned: dict[str, list[list[str]]] = {"sharded": [], "plain": []}
    shipped = []
    for step in range(STEPS):
        if step == SYNC_BEFORE_STEP:
            ours, calls = counter.count(tracker.mark_synced)
            theirs, plain_calls = counter.count(plain_tracker.mark_synced)
            naive = sum(int((bits(p) != sync_point[n]).sum()) for n, p in plain.named_parameters())
            assert ours == theirs == naive, (name, rank, ours, theirs, naive)
            reduces["mark_synced"].append(calls)
            assert plain_calls == 0, (name, plain_calls)
            sync_point = full_bits(plain)
            shipped.append(ours)
        if step == EDIT_BEFORE_STEP:
            edit_outside_step(tracked, sharded)
            edit_outside_step(plain, False)
            edited, edited_plain = full_bits(tracked), full_bits(plain)  # the same element, once
            assert all(torch.equal(edited[n], edited_plain[n]) for n in edited_plain), (name, rank)
        grads = gradients(plain, step)
        set_gradients(model, grads)
        set_gradients(plain, grads)
        before = full_bits(plain)
        # Stochastic rounding draws one seed per step from the default generator: the same for both.
        torch.manual_seed(1000 + step)
        messages, calls = counter.count(lambda: step_recording_warnings(optimizer))
        reduces["step"].append(calls)
        torch.manual_seed(1000 + step)
        plain_messages, plain_calls = counter.count(lambda: step_recording_warnings(plain_optimizer))
        reduces["plain_step"].append(plain_calls)
        warned["sharded"].append(messages)
        warned["plain"].append(plain_messages)

        after, after_plain = full_bits(tracked), full_bits(plain)
        for param_name in after_plain:
            assert torch.equal(after[param_name], after_plain[param_name]), (name, rank, step, param_name)
        record, plain_record = tracker.history[-1], plain_tracker.history[-1]
        assert record == plain_record, (name, rank, step, differences(record, plain_record))
        # The plain tracker against an oracle that does not use the package.
        naive = {n: int((after_plain[n] != before[n]).sum()) for n in after_plain}
        assert plain_record["per_param"] == naive, (name, rank, step, plain_record["per_param"], naive)
        assert plain_record["total"] == expected_total
        if step != EDIT_BEFORE_STEP:  # that step's figures miss the edit, as documented
            cumulative = sum(int((after_plain[n] != reference[n]).sum()) for n in after_plain)
            assert plain_record["cumulative_changed"] == cumulative, (name, rank, step)
            since_sync = sum(int((after_plain[n] != sync_point[n]).sum()) for n in after_plain)
            assert plain_record["changed_since_sync"] == since_sync, (name, rank, step)
        else:  # the edited weights become the reference and the sync point
            tracker.reset_reference()
            plain_tracker.reset_reference()
            reference = sync_point = full_bits(plain)

    ours, calls = counter.count(lambda: tracker.changed_since_sync)
    assert ours == plain_tracker.changed_since_sync, (name, rank)
    reduces["changed_since_sync"].append(calls)
    masks, plain_masks = tracker.changed_masks("reference"), plain_tracker.changed_masks("reference")
    for param_name, mask in masks.items():
        assert isinstance(mask, DTensor) == isinstance(dict(tracked.named_parameters())[param_name], DTensor)
        full = mask.full_tensor() if isinstance(mask, DTensor) else mask
        assert torch.equal(full, plain_masks[param_name]), (name, rank, param_name)
        assert torch.equal(full, after_plain[param_name] != reference[param_name]), (name, rank, param_name)
    summary, plain_summary = tracker.summary(), plain_tracker.summary()
    summary.pop("memory"), plain_summary.pop("memory")  # per rank by design
    assert summary == plain_summary, (name, rank, differences(summary, plain_summary))

    expected_reduces = 1 if sharded else 0
    for what, counts in reduces.items():
        want = 0 if what == "plain_step" else expected_reduces
        assert all(count == want for count in counts), (name, rank, what, counts)
    # Rank 0 alone warns, once per warning (both trackers' records are global here).
    for messages in (*warned["sharded"], *warned["plain"]):
        assert (messages == []) if rank != 0 else True, (name, rank, messages)
    if rank == 0:
        assert warned["sharded"] == warned["plain"], (name, warned)
        assert any("changed outside" in m for m in warned["sharded"][EDIT_BEFORE_STEP]), (name, warned)
        assert any("NaN/inf" in m for m in warned["sharded"][INF_STEP]), (name, warned)

    history = tracker.history
    assert history[EDIT_BEFORE_STEP]["changed_outside_step"] == [EDITED], (name, rank, history)
    assert history[INF_STEP]["nonfinite"] == 1, (name, rank)
    assert all(r["changed"] > 0 for r in history), (name, rank)
    if rank == 0:
        assert [json.loads(line) for line in stream.read_text().splitlines()] == history, name
    else:
        assert not stream.exists(), (name, rank)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, history)
    assert all(h == gathered[0] for h in gathered), (name, "records differ between ranks")
    return {
        "history": history,
        "plain_history": plain_tracker.history,
        "all_reduces": reduces,
        "shipped": shipped,
        "memory": tracker.memory_bytes(),
        "plain_memory": plain_tracker.memory_bytes(),
    }


def main() -> None:
    args, mesh = start(__doc__)
    counter = AllReduceCounter()
    results: dict[str, Any] = {}
    started = time.perf_counter()

    def sgd(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=2**-4, momentum=0.5)

    scenarios: list[tuple[str, Callable[[nn.Module], torch.optim.Optimizer], str]] = [
        ("fsdp2_sgd", sgd, "fsdp2"),
        ("ddp_sgd", sgd, "ddp"),
        ("fsdp2_rlsgd", lambda m: RLSGD(m.parameters(), lr=2**-4, momentum=0.5, rounding="stochastic"), "fsdp2"),
        ("fsdp2_rlsgd_triton", lambda m: RLSGD(m.parameters(), lr=2**-4, backend="triton"), "fsdp2"),
    ]
    for name, make_optimizer, layout in scenarios:
        if args.scenario not in ("all", name):
            continue
        plain = make_model()
        model = copy.deepcopy(plain)
        if layout == "fsdp2":
            model = shard(model, mesh)
        else:
            model = DistributedDataParallel(model)
        results[name] = run_scenario(name, model, plain, make_optimizer, counter, args.out, sharded=layout == "fsdp2")
    results["wall_s"] = time.perf_counter() - started
    write_result(args.out, "tracker", results)
    finish()


if __name__ == "__main__":
    main()
