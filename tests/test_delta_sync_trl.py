"""Delta weight sync in TRL: DeltaSyncCallback keeps an in-process replica (the stand-in for the
inference engine) bit-identical to the trained weights at every GRPO weight load, and
VLLMDeltaSync makes TRL's vLLM weight sync ship only the tensors that changed.

Offline on CPU, with the tiny bf16 Llama and the GRPO settings of test_trl_integration. vLLM is not
installed: its client / colocated engine are faked (recording what they receive, writing it into
a replica model); the rest of TRL's VLLMGeneration runs for real.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import types
from typing import Any

import pytest
import torch
from datasets import Dataset
from test_trl_integration import grpo_kwargs, make_config, make_model
from trl import GRPOTrainer
from trl.distributed import DistributedBackend
from trl.generation import vllm_generation as trl_vllm_generation
from trl.generation.vllm_generation import VLLMGeneration

from sparse_rl_optim import RLSGD
from sparse_rl_optim.deltas.packet import PacketError
from sparse_rl_optim.demo.task import build_tokenizer, make_prompts
from sparse_rl_optim.integrations.trl import DeltaSyncCallback, ReplicaMismatchError, VLLMDeltaSync

RLSGD_LR = 0.01  # moves a minority of the bf16 weights per step
ADAMW_LR = 1e-3


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer()


@pytest.fixture(scope="module")
def dataset() -> Dataset:
    return Dataset.from_list(make_prompts(64, max_operand=9, seed=1))


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1).view(torch.int16)


def named_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def differing_elements(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> int:
    return sum(int((bits(a[name]) != bits(b[name])).sum()) for name in a)


def bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(bits(a[name]), bits(b[name])) for name in a)


def record_generations(trainer: GRPOTrainer) -> list[int]:
    """global_step at each training generation of GRPO (a weight load for an inference engine)."""
    generated_at: list[int] = []
    generate = trainer._generate_and_score_completions

    def recording(*args: Any, **kwargs: Any) -> Any:
        if trainer.model.training:
            generated_at.append(trainer.state.global_step)
        return generate(*args, **kwargs)

    trainer._generate_and_score_completions = recording
    return generated_at


def check_each_sync(callback: DeltaSyncCallback, model: torch.nn.Module, replica: torch.nn.Module) -> list[dict]:
    """Wrap ``callback.sync``: after each, compare replica and model naively, and count the elements
    that differ from the weights at the previous sync."""
    checks: list[dict[str, Any]] = []
    sync = callback.sync

    def checked_sync(*args: Any, **kwargs: Any) -> dict[str, Any]:
        record = sync(*args, **kwargs)
        trained = named_weights(model)
        previous = checks[-1]["weights"] if checks else None
        checks.append(
            {
                "step": record["step"],
                "equal": bit_identical(trained, named_weights(replica)),
                "changed": None if previous is None else differing_elements(previous, trained),
                "weights": trained,
            }
        )
        return record

    callback.sync = checked_sync
    return checks


# -- DeltaSyncCallback: an in-process replica ------------------------------------------------------


@pytest.mark.parametrize(
    ("optimizer_name", "overrides", "expected_syncs"),
    [
        # GRPO loads the weights every 2 optimizer steps (generation at micro-batches 0, 2, 4)
        ("rlsgd", dict(num_iterations=2, max_steps=6), [2, 4]),
        # every 3 optimizer steps (micro-batches 0, 3, 6)
        ("adamw", dict(steps_per_generation=3, max_steps=7), [3, 6]),
    ],
)
def test_replica_is_bit_identical_after_every_grpo_sync(
    tmp_path, tokenizer, dataset, optimizer_name, overrides, expected_syncs
):
    model = make_model(tokenizer)
    replica = make_model(tokenizer, seed=1)  # other weights: only the anchor makes it equal
    assert not bit_identical(named_weights(model), named_weights(replica))
    optimizer = (
        RLSGD(model.parameters(), lr=RLSGD_LR)
        if optimizer_name == "rlsgd"
        else torch.optim.AdamW(model.parameters(), lr=ADAMW_LR)
    )
    callback = DeltaSyncCallback(replica)
    checks = check_each_sync(callback, model, replica)
    config = make_config(tmp_path, per_device_train_batch_size=4, **overrides)
    trainer = GRPOTrainer(**grpo_kwargs(tokenizer, dataset, model, config), optimizers=(optimizer, None))
    trainer.add_callback(callback)
    generated_at = record_generations(trainer)
    trainer.train()

    # One sync per GRPO weight load: the anchor at train begin (first generation), then a delta at
    # each later generation, several optimizer steps apart.
    assert generated_at == [0, *expected_syncs]
    records = callback.syncs
    assert [r["step"] for r in records] == [0, *expected_syncs]
    assert [r["anchor"] for r in records] == [True] + [False] * len(expected_syncs)
    assert [r["sequence"] for r in records] == list(range(1, len(records) + 1))

    # Bit for bit after every sync (the callback verified too), and every delta carried exactly the
    # elements that changed since the previous sync — changes of several optimizer steps.
    assert [c["step"] for c in checks] == [r["step"] for r in records]
    assert all(c["equal"] for c in checks)
    full_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert records[0]["packet_bytes"] == records[0]["full_bytes"] == full_bytes
    for record, check in zip(records[1:], checks[1:], strict=True):
        assert record["changed_elements"] == check["changed"] > 0
        assert record["full_bytes"] == full_bytes
        assert record["packet_bytes"] < full_bytes
        if optimizer_name == "rlsgd":
            assert record["packet_bytes"] / full_bytes < 0.2  # measured ~0.12-0.13

    summary = callback.delta_summary()
    assert summary["syncs"] == len(records) and summary["anchors"] == 1 and summary["deltas"] == len(records) - 1
    ratios = [r["packet_bytes"] / r["full_bytes"] for r in records[1:]]
    assert summary["mean_ratio"] == pytest.approx(sum(ratios) / len(ratios))
    assert summary["changed_elements"] == sum(c["changed"] for c in checks[1:])
    assert summary["packet_bytes"] == sum(r["packet_bytes"] for r in records)

    # The sync at step s happens while GRPO accumulates step s + 1: it shows in that step's log entry.
    logged = {e["step"]: e for e in trainer.state.log_history if "delta/packet_bytes" in e}
    assert sorted(logged) == [r["step"] + 1 for r in records]
    for record in records:
        entry = logged[record["step"] + 1]
        assert entry["delta/packet_bytes"] == record["packet_bytes"]
        assert entry["delta/full_bytes"] == record["full_bytes"]
        assert entry["delta/ratio"] == pytest.approx(record["packet_bytes"] / record["full_bytes"])

    # Independently at the end: the replica holds the weights of the last sync, not the later steps' ...
    assert bit_identical(named_weights(replica), checks[-1]["weights"])
    assert not bit_identical(named_weights(replica), named_weights(model))
    # ... until they are shipped too.
    final = callback.sync(trainer.state.global_step)
    assert not final["anchor"] and final["changed_elements"] > 0
    assert bit_identical(named_weights(replica), named_weights(model))


def test_periodic_anchors_and_a_dict_replica(tmp_path, tokenizer, dataset):
    model = make_model(tokenizer)
    replica = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    callback = DeltaSyncCallback(replica, anchor_every=2, encoding="sparse")
    config = make_config(tmp_path, per_device_train_batch_size=4, num_iterations=2, max_steps=6)
    trainer = GRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, config),
        optimizers=(RLSGD(model.parameters(), lr=RLSGD_LR), None),
        callbacks=[callback],
    )
    trainer.train()
    assert [(r["step"], r["anchor"]) for r in callback.syncs] == [(0, True), (2, False), (4, True)]
    assert callback.delta_summary()["anchors"] == 2
    callback.sync(trainer.state.global_step)
    assert bit_identical(replica, named_weights(model))


class TamperReplica:
    """A callback flipping the lowest bit of element 0 of replica tensors after optimizer step ``at``."""

    def __init__(self, replica: torch.nn.Module, at: int, names: list[str] | None = None) -> None:
        self.replica, self.at, self.names = replica, at, names

    def __getattr__(self, event: str) -> Any:
        if event.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(event)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step != self.at:
            return
        for name, param in self.replica.named_parameters():
            if self.names is None or name in self.names:
                bits(param.data)[0] ^= 1


def test_tampered_replica_makes_the_next_sync_raise_packet_error(tmp_path, tokenizer, dataset):
    model = make_model(tokenizer)
    replica = make_model(tokenizer, seed=1)
    callback = DeltaSyncCallback(replica)
    config = make_config(tmp_path, per_device_train_batch_size=4, num_iterations=2, max_steps=6)
    trainer = GRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, config),
        optimizers=(RLSGD(model.parameters(), lr=RLSGD_LR), None),
        callbacks=[callback, TamperReplica(replica, at=3)],  # between the syncs of steps 2 and 4
    )
    with pytest.raises(PacketError, match="does not hold what the packet was made against"):
        trainer.train()
    assert [r["step"] for r in callback.syncs] == [0, 2]  # the sync of step 4 was refused
    assert trainer.state.global_step == 4
    # An anchor rebuilds the replica.
    assert callback.sync(4, anchor=True)["anchor"]
    assert bit_identical(named_weights(replica), named_weights(model))


@pytest.mark.parametrize("verify", [True, False])
def test_verify_catches_a_replica_change_that_no_packet_touches(tmp_path, tokenizer, dataset, verify):
    """A frozen weight never changes, so no packet checks its checksum: only the full comparison
    (verify=True) notices that the replica's copy was altered."""
    model = make_model(tokenizer)
    model.model.norm.weight.requires_grad_(False)
    replica = make_model(tokenizer, seed=1)
    callback = DeltaSyncCallback(replica, verify=verify)
    config = make_config(tmp_path, per_device_train_batch_size=4, num_iterations=2, max_steps=6)
    trainer = GRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, config),
        optimizers=(RLSGD(model.parameters(), lr=RLSGD_LR), None),
        callbacks=[callback, TamperReplica(replica, at=3, names=["model.norm.weight"])],
    )
    if verify:
        with pytest.raises(ReplicaMismatchError, match=r"model\.norm\.weight") as raised:
            trainer.train()
        assert raised.value.names == ["model.norm.weight"]
    else:
        trainer.train()  # the packet of step 4 was applied without noticing
        assert [r["step"] for r in callback.syncs] == [0, 2, 4]
        callback.sync(trainer.state.global_step)  # ship the last steps too: only the tampered weight differs
        assert callback.mismatched_tensors() == ["model.norm.weight"]


# -- VLLMDeltaSync: TRL's VLLMGeneration with a fake vLLM ----------------------------------------


class FakeVLLMClient:
    """Records ``update_named_params`` and writes what it receives into ``replica``; checks that each
    received tensor differs from what it received last under that name (nothing unchanged is sent)."""

    def __init__(self, replica: torch.nn.Module, trained: torch.nn.Module | None = None, **_: Any) -> None:
        self.replica, self.trained = replica, trained
        self.calls: list[list[str]] = []
        self.last: dict[str, torch.Tensor] = {}
        self.check_changed = True
        self.resets = 0
        self.generations_checked: list[bool] = []

    def init_communicator(self, device: Any) -> None:
        pass

    def get_server_info(self) -> dict[str, Any]:
        return {"model_config": {"logprobs_mode": "processed_logprobs"}}

    def update_named_params(self, metadata: list[tuple[str, str, list[int]]], named_params: Any) -> None:
        params = dict(self.replica.named_parameters())
        received = []
        for (name, dtype, shape), (streamed_name, tensor) in zip(metadata, named_params, strict=True):
            assert streamed_name == name and dtype == "bfloat16" and list(tensor.shape) == shape
            if self.check_changed and name in self.last:
                assert not torch.equal(bits(self.last[name]), bits(tensor)), f"{name} was sent unchanged"
            self.last[name] = tensor.detach().clone()
            params[name].data.copy_(tensor)
            received.append(name)
        self.calls.append(received)

    def reset_prefix_cache(self) -> None:
        self.resets += 1

    def generate(self, prompts: list[list[int]], n: int = 1, max_tokens: int = 4, **_: Any) -> dict[str, Any]:
        """Sample with the replica, as the engine would; first check it holds the trained weights."""
        self.generations_checked.append(bit_identical(named_weights(self.replica), named_weights(self.trained)))
        generator = torch.Generator().manual_seed(len(self.generations_checked))
        completions, logprobs = [], []
        with torch.no_grad():
            for prompt in prompts:
                for _ in range(n):
                    ids, completion, token_logprobs = list(prompt), [], []
                    for _ in range(max_tokens):
                        logp = torch.log_softmax(self.replica(torch.tensor([ids])).logits[0, -1].float(), -1)
                        token = int(torch.multinomial(logp.exp(), 1, generator=generator))
                        completion.append(token)
                        token_logprobs.append([float(logp[token])])
                        ids.append(token)
                    completions.append(completion)
                    logprobs.append(token_logprobs)
        return {"prompt_ids": prompts, "completion_ids": completions, "logprobs": logprobs}


def fake_accelerator() -> types.SimpleNamespace:
    state = types.SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=None)
    return types.SimpleNamespace(is_main_process=True, device=torch.device("cpu"), state=state)


def vllm_generation(model: torch.nn.Module, mode: str, **attributes: Any) -> VLLMGeneration:
    """A real VLLMGeneration (its _iter_named_params and sync_weights run), without starting vLLM."""
    generation = object.__new__(VLLMGeneration)
    generation.model = model
    generation.accelerator = fake_accelerator()
    generation._dist = DistributedBackend(generation.accelerator)
    generation.mode = mode
    generation.enable_sleep_mode = False
    generation._weight_metadata = None
    for name, value in attributes.items():
        setattr(generation, name, value)
    return generation


def perturb(model: torch.nn.Module, names: list[str]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in names:
                bits(param.data)[:3] ^= 1


@pytest.mark.parametrize("detect", ["snapshot", "checksum"])
def test_vllm_server_sync_sends_only_changed_tensors(tokenizer, detect):
    model, replica = make_model(tokenizer), make_model(tokenizer, seed=1)
    client = FakeVLLMClient(replica)
    generation = vllm_generation(model, "server", vllm_client=client)
    sync = VLLMDeltaSync(generation, detect=detect)
    names = [name for name, _ in model.named_parameters()]

    generation.sync_weights()  # installed: what GRPOTrainer calls
    assert client.calls == [names]  # the first sync sends everything
    assert bit_identical(named_weights(replica), named_weights(model))

    changed = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    perturb(model, changed)
    with torch.no_grad():  # -0.0 and 0.0 compare equal as floats, not as bits
        model.model.norm.weight.view(torch.int16)[0] = 0
        replica.model.norm.weight.view(torch.int16)[0] = 0
        model.model.norm.weight.view(torch.int16)[0] = -32768
    generation.sync_weights()
    assert client.calls[-1] == [name for name in names if name in [*changed, "model.norm.weight"]]
    assert bit_identical(named_weights(replica), named_weights(model))

    generation.sync_weights()  # nothing changed: nothing streamed, the prefix cache still reset
    assert len(client.calls) == 2 and client.resets == 3
    assert [(h["sent"], h["total"]) for h in sync.history] == [(12, 12), (3, 12), (0, 12)]
    assert sync.history[1]["sent_bytes"] < sync.history[1]["full_bytes"]

    sync.uninstall()
    client.check_changed = False
    generation.sync_weights()  # TRL's own: everything again
    assert client.calls[-1] == names


def test_vllm_colocate_sync_loads_only_changed_tensors_and_sleep_mode_loads_all(tokenizer):
    model, replica = make_model(tokenizer), make_model(tokenizer, seed=1)
    loaded: list[str] = []
    replica_params = dict(replica.named_parameters())

    def load_weights(weights: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in weights:
            loaded.append(name)
            replica_params[name].data.copy_(tensor)

    engine_model = types.SimpleNamespace(load_weights=load_weights)
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=engine_model))
    llm = types.SimpleNamespace(
        llm_engine=types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=worker)),
        reset_prefix_cache=lambda: None,
        wake_up=lambda tags: None,
    )
    generation = vllm_generation(model, "colocate", llm=llm)
    sync = VLLMDeltaSync(generation)
    names = [name for name, _ in model.named_parameters()]
    generation.sync_weights()
    assert loaded == names
    loaded.clear()
    perturb(model, ["model.layers.0.mlp.up_proj.weight"])
    generation.sync_weights()
    assert loaded == ["model.layers.0.mlp.up_proj.weight"]
    assert bit_identical(named_weights(replica), named_weights(model))

    generation.enable_sleep_mode = True  # sleep level 2 drops vLLM's weights: TRL's full push runs
    loaded.clear()
    generation.sync_weights()
    assert loaded == names and sync.history[-1]["full"]


def test_vllm_delta_sync_refuses_an_unknown_trl_layout(tokenizer):
    with pytest.raises(AttributeError, match=r"_iter_named_params.*trl 1\.16"):
        VLLMDeltaSync(types.SimpleNamespace(mode="server", accelerator=fake_accelerator(), sync_weights=None))
    generation = vllm_generation(make_model(tokenizer), "server", vllm_client=object())
    with pytest.raises(AttributeError, match="update_named_params"):
        VLLMDeltaSync(generation)
    broken = vllm_generation(make_model(tokenizer), "colocate", llm=types.SimpleNamespace())
    with pytest.raises(AttributeError, match="driver_worker"):
        VLLMDeltaSync(broken).sync_weights()


def test_grpo_with_fake_vllm_server_ships_only_changed_tensors(tmp_path, tokenizer, dataset, monkeypatch):
    """A real GRPO run with use_vllm=True (server mode): TRL calls sync_weights at its own schedule,
    the fake server's replica generates the completions, and holds the trained weights each time."""
    model, replica = make_model(tokenizer), make_model(tokenizer, seed=1)
    monkeypatch.setattr(trl_vllm_generation, "is_vllm_available", lambda: True)
    monkeypatch.setattr(trl_vllm_generation, "VLLMClient", lambda **kw: FakeVLLMClient(replica, model, **kw))
    config = make_config(
        tmp_path, per_device_train_batch_size=4, num_iterations=2, max_steps=6, use_vllm=True, vllm_mode="server"
    )
    trainer = GRPOTrainer(
        **grpo_kwargs(tokenizer, dataset, model, config), optimizers=(RLSGD(model.parameters(), lr=RLSGD_LR), None)
    )
    sync = VLLMDeltaSync.for_trainer(trainer)
    trainer.train()
    client = trainer.vllm_generation.vllm_client
    names = [name for name, _ in model.named_parameters()]
    assert client.generations_checked == [True, True, True]  # weights of steps 0, 2, 4
    assert len(client.calls) == 3 and client.calls[0] == names
    for sent in client.calls[1:]:  # the norms barely move: whole tensors left out
        assert 0 < len(sent) < len(names)
    assert all(h["sent_bytes"] < h["full_bytes"] for h in sync.history[1:])
