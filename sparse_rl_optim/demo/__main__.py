"""``make demo``: GRPO with RLSGD on a tiny Llama, offline (CPU, or a GPU if present), watching the bf16 precision gate.

    python -m sparse_rl_optim.demo [--optimizer rlsgd|adamw|sgd|dense-block-adamw|dense-block-sgd] [--steps N] ...

Builds a tokenizer and a tiny Llama locally, warm-starts it on integer addition with a short
supervised run (so RL has something to improve), then runs TRL's ``GRPOTrainer`` with bf16 weights
and an exact-match reward. Prints, per step, the reward and what the precision gate did, then the
optimizer-state bytes against AdamW's (measured) and greedy accuracy before and after RL, and writes
``gate.png`` and ``gate_history.jsonl`` to the output directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from sparse_rl_optim import RLSGD, DenseBlockAdamW, DenseBlockSGD, optimizer_state_bytes
from sparse_rl_optim.demo.task import addition_reward, build_tiny_llama, build_tokenizer, make_prompts

OPTIMIZERS = ("rlsgd", "adamw", "sgd", "dense-block-adamw", "dense-block-sgd")
# The tiny model's per-element gradients are ~100x larger than a billion-parameter model's (they
# shrink like 1/sqrt(#params)), so lr 0.1 here would move most weights every step. These defaults put
# the per-step update at the scale the SGD-in-RL recipe (lr ~0.1) reaches on real LLMs.
DEFAULT_LR = {"rlsgd": 0.01, "sgd": 0.01, "adamw": 3e-4, "dense-block-adamw": 3e-4, "dense-block-sgd": 0.01}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sparse_rl_optim.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="rlsgd")
    parser.add_argument("--steps", type=int, default=100, help="GRPO optimizer steps")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default per optimizer)")
    parser.add_argument("--momentum", type=float, default=0.0, help="RLSGD/SGD momentum")
    parser.add_argument("--rounding", choices=("nearest", "stochastic"), default="nearest", help="RLSGD rounding")
    parser.add_argument("--density", type=float, default=0.05, help="dense-block: fraction of tiles trained")
    parser.add_argument(
        "--select", choices=("grad", "random", "off_principal"), default="grad", help="dense-block tile selection"
    )
    parser.add_argument("--reselect-every", type=int, default=25, help="dense-block: steps between reselections")
    parser.add_argument("--rest", choices=("freeze", "sgd"), default="freeze", help="dense-block: outside the tiles")
    parser.add_argument(
        "--rest-lr", type=float, default=None, help="dense-block: lr of rest='sgd' (AdamW: 0.01; SGD: --lr)"
    )
    parser.add_argument("--warm-start-steps", type=int, default=1000, help="supervised steps before RL")
    parser.add_argument("--max-operand", type=int, default=49)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="demo_output")
    parser.add_argument(
        "--delta-sync",
        action="store_true",
        help="keep an in-process replica in sync by delta packets at every GRPO weight sync; report packet sizes",
    )
    parser.add_argument(
        "--save-every", type=int, default=0, help="save model checkpoints every N steps (for RELEX; 0: none)"
    )
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    if args.save_every < 0:
        parser.error("--save-every must be >= 0")
    if args.lr is None:
        args.lr = DEFAULT_LR[args.optimizer]
    return args


def warm_start(model: torch.nn.Module, tokenizer: Any, *, steps: int, max_operand: int, seed: int) -> float:
    """Teacher-forced training on ``a+b=sum</s>``, loss on the answer tokens only (fp32, AdamW);
    returns the last loss."""
    rows = make_prompts(steps * 32, max_operand=max_operand, seed=seed + 1)
    texts = [row["prompt"] + row["answer"] + tokenizer.eos_token for row in rows]
    answer_lengths = torch.tensor([len(tokenizer(row["answer"]).input_ids) + 1 for row in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch = tokenizer(texts[step * 32 : (step + 1) * 32], return_tensors="pt", padding=True).to(model.device)
        # Left padding: the answer (and </s>) are the last tokens of every row.
        positions = torch.arange(batch.input_ids.shape[1], device=model.device)
        first_answer = batch.input_ids.shape[1] - answer_lengths[step * 32 : (step + 1) * 32].to(model.device)
        labels = batch.input_ids.masked_fill(positions < first_answer.unsqueeze(1), -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.no_grad()
def greedy_accuracy(model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Fraction of prompts whose greedy completion is exactly the sum."""
    model.eval()
    batch = tokenizer([row["prompt"] for row in rows], return_tensors="pt", padding=True).to(model.device)
    output = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completions = tokenizer.batch_decode(output[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    rewards = addition_reward(completions, [row["answer"] for row in rows])
    return sum(rewards) / len(rewards)


def build_optimizer(args: argparse.Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "rlsgd":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the demo's small lr is deliberate, see DEFAULT_LR
            return RLSGD(params, lr=args.lr, momentum=args.momentum, rounding=args.rounding)
    if args.optimizer == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum)
    dense_block = dict(
        density=args.density,
        select=args.select,
        reselect_every=args.reselect_every,
        rest=args.rest,
        rest_lr=args.rest_lr,
    )
    if args.optimizer == "dense-block-adamw":
        if args.rest == "sgd" and args.rest_lr is None:
            dense_block["rest_lr"] = DEFAULT_LR["rlsgd"]  # SGD needs its own, far larger lr than AdamW
        return DenseBlockAdamW(params, lr=args.lr, weight_decay=0.0, **dense_block)
    if args.optimizer == "dense-block-sgd":
        return DenseBlockSGD(params, lr=args.lr, momentum=args.momentum, **dense_block)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)


def measured_adamw_state_bytes(model: torch.nn.Module) -> int:
    """AdamW's state bytes for the same parameters, measured after one step on copies."""
    copies = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters() if p.requires_grad]
    for copy in copies:
        copy.grad = torch.ones_like(copy)
    adamw = torch.optim.AdamW(copies, lr=1e-6)
    adamw.step()
    return optimizer_state_bytes(adamw)


def _format_table(rows: list[dict[str, Any]]) -> str:
    header = f"{'step':>5} {'reward':>7} {'changed/step':>13} {'cumulative':>11} {'swallowed':>10}"
    lines = [header, "-" * len(header)]
    for row in rows:
        swallowed = row.get("gate/swallowed_fraction")
        lines.append(
            f"{row['step']:>5} {row.get('reward', float('nan')):>7.3f} "
            f"{100 * row['gate/changed_fraction']:>12.3f}% {100 * row['gate/cumulative_changed_fraction']:>10.3f}% "
            + (f"{100 * swallowed:>9.3f}%" if swallowed is not None else f"{'n/a':>10}")
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Warm start, GRPO with the gate callback, report. Returns the figures it printed."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # bitsandbytes (installed for the tests) announces at import that its optional 4-bit CPU kernel
    # is missing; the demo does not use it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from datasets import Dataset
    from transformers import PrinterCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    from sparse_rl_optim.integrations.trl import PrecisionGateCallback

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations not ours
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    started = time.perf_counter()

    tokenizer = build_tokenizer()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_tiny_llama(tokenizer, hidden_size=args.hidden_size, layers=args.layers).to(device)
    warm_loss = warm_start(model, tokenizer, steps=args.warm_start_steps, max_operand=args.max_operand, seed=args.seed)
    model = model.to(torch.bfloat16)  # RL on bf16 weights, as in the SGD-in-RL recipe
    held_out = make_prompts(256, max_operand=args.max_operand, seed=args.seed + 3)
    accuracy_before = greedy_accuracy(model, tokenizer, held_out)

    optimizer = build_optimizer(args, model)
    config = GRPOConfig(
        output_dir=str(output_dir / "trainer"),
        use_cpu=device == "cpu",
        bf16=False,
        report_to="none",
        gradient_checkpointing=False,
        max_steps=args.steps,
        per_device_train_batch_size=64,
        num_generations=8,
        max_completion_length=4,
        temperature=1.0,
        beta=0.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="steps" if args.save_every else "no",
        save_steps=args.save_every or 500,
        save_only_model=True,
        seed=args.seed,
        disable_tqdm=True,
    )
    callback = PrecisionGateCallback(jsonl_path=str(output_dir / "gate_history.jsonl"))
    callbacks: list[Any] = [callback]
    delta_callback = None
    if args.delta_sync:
        import copy

        from sparse_rl_optim.integrations.trl import DeltaSyncCallback

        # The replica stands in for the inference engine: it starts from other weights (the anchor fixes that).
        replica = copy.deepcopy(model)
        with torch.no_grad():
            for param in replica.parameters():
                param.zero_()
        delta_callback = DeltaSyncCallback(replica)
        callbacks.append(delta_callback)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=addition_reward,
        args=config,
        train_dataset=Dataset.from_list(
            make_prompts(args.steps * 8 + 64, max_operand=args.max_operand, seed=args.seed + 2)
        ),
        processing_class=tokenizer,
        optimizers=(optimizer, None),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # the table below replaces the per-step log dicts
    trainer.train()
    accuracy_after = greedy_accuracy(model, tokenizer, held_out)

    rows = [entry for entry in trainer.state.log_history if "gate/changed_fraction" in entry]
    every = -(-len(rows) // 25)  # at most ~25 rows on screen; gate_history.jsonl has every step
    print(_format_table([row for index, row in enumerate(rows) if index % every == 0 or index == len(rows) - 1]))
    tracker = callback.tracker
    assert tracker is not None
    title = f"{args.optimizer} lr={args.lr:g} on a {tracker.total / 1e6:.2f}M-param bf16 Llama (GRPO)"
    tracker.plot(output_dir / "gate.png", title=title)
    summary = tracker.summary()
    figures = {
        "optimizer": args.optimizer,
        "lr": args.lr,
        "params": tracker.total,
        "warm_start_loss": warm_loss,
        "greedy_accuracy_before": accuracy_before,
        "greedy_accuracy_after": accuracy_after,
        "mean_reward_first_quarter": _mean([row.get("reward") for row in rows[: max(1, len(rows) // 4)]]),
        "mean_reward_last_quarter": _mean([row.get("reward") for row in rows[-max(1, len(rows) // 4) :]]),
        "mean_changed_fraction": summary["mean_changed_fraction"],
        "cumulative_changed_fraction": summary["cumulative_changed_fraction"],
        "swallowed_fraction": summary["swallowed_fraction"],
        "swallowed_of_intended": summary["swallowed_of_intended"],
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "optimizer_state_report": optimizer.state_bytes_report() if hasattr(optimizer, "state_bytes_report") else None,
        "adamw_state_bytes": measured_adamw_state_bytes(model),
        "tracker_memory": summary["memory"],
        "delta_sync": None
        if delta_callback is None
        else {**delta_callback.delta_summary(), "records": delta_callback.syncs},
        "seconds": time.perf_counter() - started,
    }
    (output_dir / "summary.json").write_text(json.dumps(figures, indent=2))
    _print_summary(figures, output_dir)
    return figures


def _mean(values: list[Any]) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _print_summary(figures: dict[str, Any], output_dir: Path) -> None:
    params = figures["params"]
    swallowed = figures["swallowed_of_intended"]
    print()
    print(f"model: {params:,} bf16 params; optimizer {figures['optimizer']} lr={figures['lr']:g}")
    print(
        f"optimizer state: {figures['optimizer_state_bytes']:,} bytes "
        f"({figures['optimizer_state_bytes'] / params:.2f} B/param) vs AdamW {figures['adamw_state_bytes']:,} bytes "
        f"({figures['adamw_state_bytes'] / params:.2f} B/param, measured)"
    )
    report = figures["optimizer_state_report"]
    if report is not None:
        print(
            f"  dense-block state: {report['rows']:,} B of moment rows for {report['blocked_numel']:,} blocked "
            f"params ({report['rows'] / max(report['blocked_numel'], 1):.2f} B/param), {report['index']:,} B of "
            f"tile ids and step counts, {report['selection']:,} B of gradient energy, {report['dense']:,} B for "
            f"{report['dense_numel']:,} params handled densely (1-D tensors and tensors below dense_below)"
        )
    print(
        f"weights changed: {100 * figures['mean_changed_fraction']:.3f}% per step on average, "
        f"{100 * figures['cumulative_changed_fraction']:.3f}% differ from the start of RL"
    )
    if swallowed is not None:
        print(f"precision gate: swallowed {100 * swallowed:.2f}% of the non-zero updates")
    print(
        f"sampled reward: {figures['mean_reward_first_quarter']:.3f} in the first quarter of the steps, "
        f"{figures['mean_reward_last_quarter']:.3f} in the last; greedy accuracy on 256 held-out prompts "
        f"{figures['greedy_accuracy_before']:.3f} -> {figures['greedy_accuracy_after']:.3f}"
    )
    delta = figures["delta_sync"]
    if delta is not None and delta["deltas"] and delta["delta_packet_bytes"]:
        shipped = delta["delta_packet_bytes"] / delta["deltas"]
        full = delta["delta_full_bytes"] / delta["deltas"]
        print(
            f"delta sync: {delta['syncs']} syncs verified bit-exact on the replica; a delta packet is {shipped:,.0f} B "
            f"on average against {full:,.0f} B for the full bf16 state dict ({full / shipped:.1f}x smaller), "
            f"{100 * delta['changed_elements'] / delta['deltas'] / params:.2f}% of the weights changed per sync"
        )
    memory = figures["tracker_memory"]
    print(
        f"tracker memory: {memory['persistent_bytes_per_param']:.3f} B/param persistent, "
        f"{memory['step_snapshot_bytes_per_param']:.1f} B/param during a step"
    )
    print(f"wrote {output_dir / 'gate.png'}, {output_dir / 'gate_history.jsonl'}, {output_dir / 'summary.json'}")
    print(f"took {figures['seconds']:.1f} s")


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
