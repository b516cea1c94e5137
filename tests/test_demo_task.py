"""The demo's task pieces: the split of the problems, the warm start, the held-out evaluation and
the progress rows, each against a written-out reference."""

from __future__ import annotations

import io

import pytest
import torch

from sparse_rl_optim.demo.evaluate import greedy_accuracy, sampled_accuracy
from sparse_rl_optim.demo.grpo import ProgressPrinter
from sparse_rl_optim.demo.task import (
    SPLITS,
    build_tiny_llama,
    build_tokenizer,
    make_prompts,
    max_completion_tokens,
    split_pairs,
)
from sparse_rl_optim.demo.warm_start import warm_start


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("max_operand", [9, 49])
def test_split_pairs_partitions_every_problem(max_operand):
    splits = split_pairs(max_operand)
    everything = {(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)}
    seen = [pair for pairs in splits.values() for pair in pairs]
    assert len(seen) == len(set(seen)) == len(everything)  # disjoint
    assert set(seen) == everything
    unordered = max_operand + 1 + (max_operand + 1) * max_operand // 2  # {a, b}: a == b, plus a < b
    for name, share in SPLITS.items():
        pairs = set(splits[name])
        assert all((b, a) in pairs for a, b in pairs), f"{name}: a commuted twin fell into another split"
        assert abs(sum(a <= b for a, b in pairs) - share * unordered) <= 1


def test_make_prompts_draws_only_from_its_split():
    splits = split_pairs(49)
    rows = make_prompts(500, max_operand=49, seed=11, split="train")
    for row in rows:
        a, b = (int(x) for x in row["prompt"].rstrip("=").split("+"))
        assert (a, b) in splits["train"] and (a, b) not in splits["held_out"] and (a, b) not in splits["validation"]
        assert row["answer"] == str(a + b)
    held_out = set(splits["held_out"])
    every = make_prompts(None, max_operand=49, seed=3, split="held_out")
    assert sorted(row["prompt"] for row in every) == sorted(f"{a}+{b}=" for a, b in held_out)
    assert every != make_prompts(None, max_operand=49, seed=4, split="held_out")  # seeded order
    with pytest.raises(ValueError, match="split must be one of"):
        make_prompts(3, max_operand=9, seed=0, split="test")
    with pytest.raises(ValueError, match="needs a split"):
        make_prompts(None, max_operand=9, seed=0)
    with pytest.raises(ValueError, match="split empty"):
        split_pairs(1)  # 3 unordered pairs: no validation problem


def test_build_tiny_llama_default_init_scales_with_width(tokenizer):
    torch.manual_seed(0)
    wide = build_tiny_llama(tokenizer, hidden_size=128, layers=1)
    std = wide.model.layers[0].mlp.up_proj.weight.std().item()
    assert std == pytest.approx(128**-0.5, rel=0.05)
    narrow = build_tiny_llama(tokenizer, hidden_size=128, layers=1, initializer_range=0.02)
    assert narrow.model.layers[0].mlp.up_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def _naive_greedy(model, tokenizer, prompt: str) -> str:
    """Greedy decoding one prompt at a time with full forward passes, no cache, no padding."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = []
    for _ in range(max_completion_tokens(19)):
        token = model(ids).logits[0, -1].argmax().item()
        if token == tokenizer.eos_token_id:
            break
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokenizer.decode(out).replace(" ", "")  # the word-level decoder joins tokens with spaces


def test_greedy_and_sampled_accuracy_match_a_naive_decode(tokenizer):
    torch.manual_seed(7)
    model = build_tiny_llama(tokenizer, hidden_size=64, layers=1)
    warm_start(model, tokenizer, max_operand=19, seed=0, target_accuracy=0.3, max_steps=1000)
    model.eval()
    rows = make_prompts(None, max_operand=19, seed=1, split="held_out")
    with torch.no_grad():
        naive = [_naive_greedy(model, tokenizer, row["prompt"]) == row["answer"] for row in rows]
    assert 0 < sum(naive) < len(rows), "the reference needs a model that is neither always nor never right"
    assert greedy_accuracy(model, tokenizer, rows) == pytest.approx(sum(naive) / len(rows))

    state = torch.random.get_rng_state()
    first = sampled_accuracy(model, tokenizer, rows, temperature=1.0, samples_per_prompt=8, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    assert sampled_accuracy(model, tokenizer, rows, temperature=1.0, samples_per_prompt=8, seed=5) == first
    assert 0 <= first <= 1
    # At a vanishing temperature sampling is greedy.
    cold = sampled_accuracy(model, tokenizer, rows, temperature=1e-4, samples_per_prompt=2, seed=5)
    assert cold == pytest.approx(sum(naive) / len(rows))


def _fresh(tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    return build_tiny_llama(tokenizer, hidden_size=32, layers=1)


def test_warm_start_stops_at_the_first_check_that_meets_the_target(tokenizer):
    model = _fresh(tokenizer)
    result = warm_start(model, tokenizer, max_operand=9, seed=0, target_accuracy=1.0, max_steps=7, check_every=5)
    assert (result.steps, result.reached_target) == (7, False)
    assert result.validation_accuracy < 1.0
    rows = make_prompts(None, max_operand=9, seed=0, split="validation")
    assert greedy_accuracy(model, tokenizer, rows) == result.validation_accuracy

    target, every = 0.2, 10
    stopped = warm_start(_fresh(tokenizer), tokenizer, max_operand=19, seed=0, target_accuracy=target, max_steps=400,
                         check_every=every)  # fmt: skip
    assert stopped.reached_target and stopped.validation_accuracy >= target and stopped.steps % every == 0
    # The reference: the same (deterministic) run for a fixed number of steps, one check earlier, is
    # still below the target; the run to the stopping step reaches it.
    earlier = warm_start(_fresh(tokenizer), tokenizer, max_operand=19, seed=0, target_accuracy=None,
                         max_steps=stopped.steps - every)  # fmt: skip
    assert earlier.validation_accuracy < target
    same = warm_start(
        _fresh(tokenizer), tokenizer, max_operand=19, seed=0, target_accuracy=None, max_steps=stopped.steps
    )
    assert same.validation_accuracy == stopped.validation_accuracy
    with pytest.raises(ValueError):
        warm_start(model, tokenizer, max_operand=9, seed=0, check_every=0)


class _State:
    def __init__(self, step: int, max_steps: int) -> None:
        self.global_step, self.max_steps = step, max_steps


def test_progress_printer_rows_average_the_steps_since_the_last_row():
    stream = io.StringIO()
    printer = ProgressPrinter(3, stream=stream)
    printer.on_train_begin(None, _State(0, 7), None)
    rewards, changed, of_updates, of_weights = torch.rand(4, 7, generator=torch.Generator().manual_seed(3)).tolist()
    for step in range(1, 8):
        logs = {
            "reward": rewards[step - 1],
            "gate/changed_fraction": changed[step - 1] / 10,
            "gate/cumulative_changed_fraction": step / 10,
            "gate/swallowed_of_updates": of_updates[step - 1],
            "gate/swallowed_of_weights": of_weights[step - 1],
        }
        printer.on_log(None, _State(step, 7), None, logs=logs)
        printer.on_log(None, _State(step, 7), None, logs={"loss": 1.0})  # a log without a reward: ignored
    header, rule, *rows = stream.getvalue().splitlines()
    assert header.split() == ["step", "reward", "changed/step", "cumulative", "swallowed/updates",
                              "swallowed/weights", "time"]  # fmt: skip
    assert set(rule) == {"-"}
    assert [row.split()[0] for row in rows] == ["3", "6", "7"]
    for row, (start, stop) in zip(rows, [(0, 3), (3, 6), (6, 7)], strict=True):
        cells = row.split()

        def mean(values, scale=1.0, start=start, stop=stop):
            return scale * sum(values[start:stop]) / (stop - start)

        assert float(cells[1]) == pytest.approx(mean(rewards), abs=5e-4)
        assert float(cells[2].rstrip("%")) == pytest.approx(mean(changed, 10.0), abs=5e-4)  # 100 * x / 10
        assert cells[3] == f"{100 * stop / 10:.3f}%"
        assert float(cells[4].rstrip("%")) == pytest.approx(mean(of_updates, 100.0), abs=5e-4)
        assert float(cells[5].rstrip("%")) == pytest.approx(mean(of_weights, 100.0), abs=5e-4)
    with pytest.raises(ValueError):
        ProgressPrinter(0)
