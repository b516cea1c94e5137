"""``make demo``: GRPO with RLSGD on a tiny Llama, offline (CPU, or a GPU if present), watching the bf16 precision gate.

    sparse-rl-optim-demo [--optimizer rlsgd|adamw|sgd|dense-block-adamw|dense-block-sgd] [--steps N] ...

Builds a tokenizer and a tiny Llama locally, warm-starts it on integer addition with a short
supervised run until it solves 30% of the validation problems (so RL has something to improve), then
runs TRL's ``GRPOTrainer`` with bf16 weights and an exact-match reward. Prints a row every few steps
(reward, what the precision gate did), then the optimizer-state bytes against AdamW's (measured) and
held-out accuracy before and after RL, and writes ``gate.png`` (reward and gate panels),
``gate_history.jsonl`` and ``summary.json`` to the output directory. The task and the defaults are
explained in ``docs/rl_task.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from sparse_rl_optim import optimizer_state_bytes
from sparse_rl_optim.demo.evaluate import greedy_accuracy, sampled_accuracy
from sparse_rl_optim.demo.grpo import (
    DEFAULT_LR,
    DEFAULT_LR_WITH_MOMENTUM,
    OPTIMIZERS,
    GRPOSetup,
    ProgressPrinter,
    build_optimizer,
    train_grpo,
)
from sparse_rl_optim.demo.task import build_tiny_llama, build_tokenizer, make_prompts
from sparse_rl_optim.demo.warm_start import WarmStart, warm_start

__all__ = ["build_optimizer", "build_warm_model", "main", "parse_args", "run"]

_SETUP = GRPOSetup()


#: Flags that apply to some optimizers only, with their defaults there (``None`` on the command line
#: means "not given", so a flag given for an optimizer that ignores it is an error, not a silent no-op).
_OPTIMIZER_FLAGS: dict[str, tuple[tuple[str, ...], Any]] = {
    "momentum": (("rlsgd", "sgd", "dense-block-sgd"), 0.0),
    "rounding": (("rlsgd",), "stochastic"),
    "density": (("dense-block-adamw", "dense-block-sgd"), 0.05),
    "select": (("dense-block-adamw", "dense-block-sgd"), "grad"),
    "reselect_every": (("dense-block-adamw", "dense-block-sgd"), 25),
    "rest": (("dense-block-adamw", "dense-block-sgd"), "freeze"),
    "rest_lr": (("dense-block-adamw", "dense-block-sgd"), None),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sparse-rl-optim-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="rlsgd")
    parser.add_argument("--steps", type=int, default=_SETUP.steps, help="GRPO optimizer steps")
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"learning rate (default per optimizer: {DEFAULT_LR}; {DEFAULT_LR_WITH_MOMENTUM:g} with momentum)",
    )
    parser.add_argument("--momentum", type=float, default=None, help="rlsgd/sgd/dense-block-sgd momentum (default 0)")
    parser.add_argument(
        "--rounding",
        choices=("nearest", "stochastic"),
        default=None,
        help="rlsgd rounding to bf16 (default stochastic)",
    )
    parser.add_argument(
        "--master-weights",
        choices=("bf16", "fp32"),
        default="bf16",
        help="dtype the optimizer steps: bf16 weights, or fp32 master weights (bf16 values at the start, fp32 "
        "rollouts); the gate figures and accuracies are of the bf16 values an inference engine would load",
    )
    parser.add_argument("--prompts-per-step", type=int, default=_SETUP.prompts_per_step)
    parser.add_argument("--generations", type=int, default=_SETUP.generations, help="completions per prompt")
    parser.add_argument("--temperature", type=float, default=_SETUP.temperature, help="sampling temperature")
    parser.add_argument("--density", type=float, default=None, help="dense-block: fraction of tiles trained (0.05)")
    parser.add_argument(
        "--select", choices=("grad", "random", "off_principal"), default=None, help="dense-block tile selection (grad)"
    )
    parser.add_argument("--reselect-every", type=int, default=None, help="dense-block: steps between reselections (25)")
    parser.add_argument(
        "--rest", choices=("freeze", "sgd"), default=None, help="dense-block: outside the tiles (freeze)"
    )
    parser.add_argument(
        "--rest-lr", type=float, default=None, help="dense-block: lr of rest='sgd' (AdamW: RLSGD's default; SGD: --lr)"
    )
    parser.add_argument(
        "--warm-start-target", type=float, default=0.3, help="stop the warm start at this validation accuracy"
    )
    parser.add_argument("--warm-start-steps", type=int, default=1000, help="supervised warm-start steps, at most")
    parser.add_argument("--max-operand", type=int, default=49, help="problems a+b= with 0 <= a, b <= this")
    parser.add_argument(
        "--hidden-size", type=int, default=128, help="model width, a multiple of 8 (4 heads of an even width)"
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--init-std", type=float, default=None, help="std of the weight init (default: hidden_size ** -0.5)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=None, help="steps between progress rows (default: ~15 rows)")
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
    at_least = {"steps": 1, "prompts_per_step": 1, "generations": 2, "warm_start_steps": 0, "max_operand": 2,
                "hidden_size": 4, "layers": 1, "save_every": 0}  # fmt: skip
    for name, low in at_least.items():
        if getattr(args, name) < low:
            parser.error(f"--{name.replace('_', '-')} must be >= {low}")
    if args.hidden_size % 8:
        parser.error("--hidden-size must be a multiple of 8 (4 attention heads of an even width, for RoPE)")
    for name in ("lr", "temperature", "init_std", "density", "rest_lr"):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            parser.error(f"--{name.replace('_', '-')} must be a finite number > 0")
    if args.momentum is not None and not 0 <= args.momentum < 1:
        parser.error("--momentum must be in [0, 1)")
    if args.density is not None and args.density > 1:
        parser.error("--density must be in (0, 1]")
    if args.reselect_every is not None and args.reselect_every < 0:
        parser.error("--reselect-every must be >= 0 (0: never reselect)")
    if args.rest_lr is not None and args.rest != "sgd":
        parser.error("--rest-lr sets the lr of the weights outside the tiles: use it with --rest sgd")
    if args.rounding is not None and args.master_weights == "fp32":
        parser.error("--rounding is how RLSGD rounds to bf16 weights; with --master-weights fp32 nothing is rounded")
    if not 0 < args.warm_start_target <= 1:
        parser.error("--warm-start-target must be in (0, 1]")
    if args.log_every is not None and args.log_every < 1:
        parser.error("--log-every must be >= 1")
    if args.delta_sync and args.master_weights != "bf16":
        parser.error("--delta-sync keeps a bf16 replica of bf16 weights: use it with --master-weights bf16")
    for name, (optimizers, default) in _OPTIMIZER_FLAGS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif args.optimizer not in optimizers:
            parser.error(
                f"--{name.replace('_', '-')} applies to {', '.join(optimizers)}, not --optimizer {args.optimizer}"
            )
    if args.lr is None:
        args.lr = DEFAULT_LR_WITH_MOMENTUM if args.momentum else DEFAULT_LR[args.optimizer]
    if args.log_every is None:
        args.log_every = max(1, args.steps // 15)
    return args


def measured_adamw_state_bytes(model: torch.nn.Module) -> int:
    """AdamW's state bytes for the same parameters, measured after one step on copies."""
    copies = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters() if p.requires_grad]
    for clone in copies:
        clone.grad = torch.ones_like(clone)
    adamw = torch.optim.AdamW(copies, lr=1e-6)
    adamw.step()
    return optimizer_state_bytes(adamw)


def held_out_accuracy(
    model: torch.nn.Module, tokenizer: Any, rows: list[dict[str, str]], args: Any
) -> dict[str, float]:
    """Greedy and sampled (at the training temperature, :data:`SAMPLES_PER_PROMPT` per prompt) accuracy of the bf16 weights:
    with fp32 master weights, of their bf16 rounding, as an inference engine would load them."""
    if any(p.dtype != torch.bfloat16 for p in model.parameters()):
        model = copy.deepcopy(model).to(torch.bfloat16)
    return {
        "greedy": greedy_accuracy(model, tokenizer, rows),
        "sampled": sampled_accuracy(model, tokenizer, rows, temperature=args.temperature, seed=args.seed),
    }


def build_warm_model(args: argparse.Namespace, tokenizer: Any, device: str) -> tuple[torch.nn.Module, WarmStart]:
    """The tiny Llama for ``args`` (seeded by ``args.seed``), warm-started; fp32."""
    torch.manual_seed(args.seed)
    model = build_tiny_llama(
        tokenizer, hidden_size=args.hidden_size, layers=args.layers, initializer_range=args.init_std
    ).to(device)
    warm = warm_start(
        model,
        tokenizer,
        max_operand=args.max_operand,
        seed=args.seed,
        target_accuracy=args.warm_start_target,
        max_steps=args.warm_start_steps,
    )
    return model, warm


def run(args: argparse.Namespace, *, warm: tuple[dict[str, torch.Tensor], WarmStart] | None = None) -> dict[str, Any]:
    """Warm start, GRPO with the gate callback, report. Returns the figures it printed.

    ``warm``: a warm start made before by :func:`build_warm_model` with the same model flags, as
    ``(model.state_dict(), WarmStart)``; runs that compare optimizers start from one warm start."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # bitsandbytes (installed for the tests) announces at import that its optional 4-bit CPU kernel
    # is missing; the demo does not use it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    from sparse_rl_optim.demo.plot import plot_demo
    from sparse_rl_optim.integrations.trl import PrecisionGateCallback

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # checkpoint saves would interleave bars with the progress rows
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")  # deprecations not ours
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    tokenizer = build_tokenizer()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if warm is None:
        model, warm_result = build_warm_model(args, tokenizer, device)
    else:
        state, warm_result = warm
        made_with = (warm_result.target_accuracy, warm_result.seed, warm_result.max_operand)
        if made_with != (args.warm_start_target, args.seed, args.max_operand):
            raise ValueError(
                f"the warm start passed in was made with (target, seed, max_operand) = {made_with}, not "
                f"{(args.warm_start_target, args.seed, args.max_operand)}: build it with the same flags"
            )
        model = build_tiny_llama(tokenizer, hidden_size=args.hidden_size, layers=args.layers).to(device)
        model.load_state_dict(state)  # (the init std does not matter: every weight is overwritten)
    torch.manual_seed(args.seed)  # the same RL run whether the warm start was made here or passed in
    print(
        f"warm start: {warm_result.steps} supervised steps, validation accuracy {warm_result.validation_accuracy:.3f}"
        + ("" if warm_result.reached_target else f" (target {warm_result.target_accuracy:g} not reached)"),
        flush=True,
    )
    model = model.to(torch.bfloat16)  # RL on bf16 weights, as in the SGD-in-RL recipe
    if args.master_weights == "fp32":
        model = model.to(torch.float32)  # the same bf16 values, stored as fp32 master weights
    held_out = make_prompts(None, max_operand=args.max_operand, seed=f"held-out:{args.seed}", split="held_out")
    before = held_out_accuracy(model, tokenizer, held_out, args)

    optimizer = build_optimizer(args, model)
    callback = PrecisionGateCallback(jsonl_path=str(output_dir / "gate_history.jsonl"))
    callbacks: list[Any] = [callback, ProgressPrinter(args.log_every)]
    delta_callback = None
    if args.delta_sync:
        from sparse_rl_optim.integrations.trl import DeltaSyncCallback

        # The replica stands in for the inference engine: it starts from other weights (the anchor fixes that).
        replica = copy.deepcopy(model)
        with torch.no_grad():
            for param in replica.parameters():
                param.zero_()
        delta_callback = DeltaSyncCallback(replica)
        callbacks.append(delta_callback)
    setup = GRPOSetup(
        steps=args.steps,
        prompts_per_step=args.prompts_per_step,
        generations=args.generations,
        temperature=args.temperature,
    )
    trainer = train_grpo(
        model,
        tokenizer,
        optimizer,
        setup,
        lr=args.lr,
        seed=args.seed,
        max_operand=args.max_operand,
        output_dir=str(output_dir / "trainer"),
        callbacks=callbacks,
        save_every=args.save_every,
    )
    after = held_out_accuracy(model, tokenizer, held_out, args)

    rewards = [float(entry["reward"]) for entry in trainer.state.log_history if "reward" in entry]
    tracker = callback.tracker
    assert tracker is not None
    title = (
        f"GRPO with {args.optimizer} lr={args.lr:g} on a {tracker.total / 1e6:.2f}M-param Llama "
        f"({args.master_weights} weights), seed {args.seed}"
    )
    plot_demo(rewards, tracker.history, output_dir / "gate.png", title=title)
    summary = tracker.summary()
    quarter = max(1, len(rewards) // 4)
    figures = {
        "optimizer": args.optimizer,
        "lr": args.lr,
        "momentum": args.momentum,
        "rounding": args.rounding if args.optimizer == "rlsgd" else None,
        "master_weights": args.master_weights,
        "steps": args.steps,
        "prompts_per_step": args.prompts_per_step,
        "generations": args.generations,
        "params": tracker.total,
        "warm_start_steps": warm_result.steps,
        "warm_start_loss": warm_result.loss,
        "warm_start_validation_accuracy": warm_result.validation_accuracy,
        "held_out_prompts": len(held_out),
        "greedy_accuracy_before": before["greedy"],
        "greedy_accuracy_after": after["greedy"],
        "sampled_accuracy_before": before["sampled"],
        "sampled_accuracy_after": after["sampled"],
        "rewards": rewards,
        "mean_reward_first_quarter": sum(rewards[:quarter]) / quarter,
        "mean_reward_last_quarter": sum(rewards[-quarter:]) / quarter,
        "changed_fraction_per_step": [record["changed_fraction"] for record in tracker.history],
        "mean_changed_fraction": summary["mean_changed_fraction"],
        "cumulative_changed_fraction": summary["cumulative_changed_fraction"],
        "swallowed_of_weights": summary["swallowed_of_weights"],
        "swallowed_of_updates": summary["swallowed_of_updates"],
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
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


def _print_summary(figures: dict[str, Any], output_dir: Path) -> None:
    params = figures["params"]
    print()
    print(
        f"model: {params:,} params ({figures['master_weights']} weights); optimizer {figures['optimizer']} "
        f"lr={figures['lr']:g}"
    )
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
        f"bf16 weights changed: {100 * figures['mean_changed_fraction']:.3f}% per step on average, "
        f"{100 * figures['cumulative_changed_fraction']:.3f}% differ from the start of RL"
    )
    if figures["swallowed_of_updates"] is not None:
        print(
            f"precision gate: over the run, swallowed {100 * figures['swallowed_of_updates']:.2f}% of the non-zero "
            f"updates ({100 * figures['swallowed_of_weights']:.2f}% of all weight updates, zeros included)"
        )
    print(
        f"sampled reward: {figures['mean_reward_first_quarter']:.3f} in the first quarter of the steps, "
        f"{figures['mean_reward_last_quarter']:.3f} in the last"
    )
    print(
        f"held-out accuracy ({figures['held_out_prompts']} problems never trained on): greedy "
        f"{figures['greedy_accuracy_before']:.3f} -> {figures['greedy_accuracy_after']:.3f}, sampled "
        f"{figures['sampled_accuracy_before']:.3f} -> {figures['sampled_accuracy_after']:.3f}"
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
