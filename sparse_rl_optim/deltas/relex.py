"""RELEX: extrapolate a training trajectory from a few checkpoints along its rank-1 temporal subspace.

RELEX (arXiv 2605.21468) observes that RL fine-tuning moves each weight tensor along an almost fixed
direction at an almost constant speed, so a handful of early checkpoints predict the weights much
later (the paper matches full RL training from 15% of the steps and extrapolates 10-20x beyond the
observed window; higher ranks or nonlinear fits gain nothing, because the rank-1 projection is
what removes the step-to-step noise).

Per tensor, given checkpoints ``theta_0 .. theta_{T-1}`` at steps ``s_0 < s_1 < ... < s_{T-1}``:

1. Deltas as rows: ``M = [theta_t - theta_0 for t = 1 .. T-1]``, flattened, shape ``(T-1, n)``.
2. Temporal subspace from the small Gram matrix ``G = M M^T`` (``(T-1) x (T-1)``): its top
   eigenpair ``(lambda_1, u)`` gives the top right singular vector of ``M`` without an ``n x n``
   problem: ``v = M^T u / ||M^T u||`` (a unit vector of ``n`` elements; ``||M^T u||^2 = u^T G u``).
3. Denoised coefficients, the projections of the deltas on ``v``: ``a_t = (M v)_t``; ``a_0 = 0``.
4. A least-squares line through the ``T`` points ``(s_t - s_0, a_t)``, the base point ``(0, 0)``
   included: ``a(s) = alpha + beta (s - s_0)``. The base point is data, not a constraint: theta_0 has
   coefficient 0 exactly, it anchors the line at the start, and with a single delta the fit is still
   defined (the line through ``(0, 0)`` and ``(s_1 - s_0, a_1)``).
5. Prediction: ``theta(s) = theta_0 + a(s) v``.

The sign of ``v`` is free (``v`` and ``-v`` span the same subspace); it is fixed so that the slope
``beta >= 0``, i.e. ``v`` points the way the tensor moves. ``lambda_1 / trace(G)`` (the explained
fraction) says how rank-1 the observed trajectory is: 1 for a straight path, ``1/(T-1)`` for
uncorrelated deltas of equal size.

Numerics: the deltas are formed chunk by chunk in float64 from the checkpoint tensors (a bf16 or
fp32 difference is exact in float64), so memory stays at the checkpoints themselves plus one chunk
of ``T-1`` float64 rows, for any tensor size; the Gram matrix and the line fit are float64. The
direction is stored in float32 (float64 for float64 tensors). Predictions are computed in float64
and rounded once, to nearest even, to the tensor's dtype.

Tensors whose deltas are all zero (never changed) predict theta_0 bit for bit, and so do the
elements of a fitted tensor that no checkpoint moved (their direction is exactly 0); non-floating
tensors (and floating tensors left out with ``names``) are copied from the base. A NaN or inf in any
checkpoint raises ``ValueError`` naming the tensor and the step.

Command line (the console script ``sparse-rl-optim-relex``)::

    sparse-rl-optim-relex output/checkpoint-* --predict-step 1000 --out relex-1000 --summary relex.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import shutil
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "SafetensorsCheckpoint",
    "TensorFit",
    "TrajectoryFit",
    "fit_trajectory",
    "load_checkpoint",
    "main",
    "open_checkpoint",
    "step_from_path",
]

#: Elements per row of the float64 delta chunk (32 MiB per checkpoint row): bounds the working
#: memory of a fit and of a prediction independently of the tensor size.
DEFAULT_CHUNK_ELEMENTS = 1 << 22

_CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
_WEIGHTS_FILE = "model.safetensors"
_WEIGHTS_INDEX = "model.safetensors.index.json"
# Files of a TRL/HF checkpoint directory that are not the model config/tokenizer: left out when the
# prediction is written as a checkpoint directory (weights are replaced, training state is stale).
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_NOT_COPIED_NAMES = (_WEIGHTS_INDEX, "trainer_state.json")


# ----------------------------------------------------------------------------------------------
# The fit
# ----------------------------------------------------------------------------------------------


@dataclass
class TensorFit:
    """The RELEX fit of one tensor.

    ``kind`` is ``"fitted"`` (predicted as ``base + (alpha + beta (s - base_step)) direction``),
    ``"unchanged"`` (floating, all deltas exactly zero: predicts ``base``) or ``"copied"``
    (non-floating, or left out by ``names``: predicts ``base``). For the last two ``direction`` is
    ``None`` and the numbers are zero (``explained_fraction`` is 1: a path that does not move is
    trivially rank-1).
    """

    kind: Literal["fitted", "unchanged", "copied"]
    base: Tensor
    direction: Tensor | None = None
    alpha: float = 0.0
    beta: float = 0.0
    explained_fraction: float = 1.0
    #: ``a_t``, the projections of the deltas on ``direction``, one per checkpoint (``a_0 = 0``).
    coefficients: tuple[float, ...] = ()
    #: root mean square of ``a_t - (alpha + beta (s_t - s_0))`` over the ``T`` points.
    line_residual_rms: float = 0.0
    #: ``lambda_1`` and ``trace(G)`` of the Gram matrix (squared norms of the deltas, summed).
    top_eigenvalue: float = 0.0
    gram_trace: float = 0.0
    #: ``||theta_t - theta_0||`` per checkpoint (``sqrt(G_tt)``, 0 for the base).
    delta_norms: tuple[float, ...] = ()

    def coefficient(self, step_offset: float) -> float:
        """``a(s) = alpha + beta (s - s_0)`` for ``step_offset = s - s_0``."""
        return self.alpha + self.beta * step_offset


@dataclass
class TrajectoryFit:
    """RELEX fits of every tensor of a state dict; :meth:`predict` extrapolates the weights."""

    steps: tuple[int, ...]
    tensors: dict[str, TensorFit]
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    @property
    def base_step(self) -> int:
        return self.steps[0]

    def predict(self, step: float) -> dict[str, Tensor]:
        """``theta(step) = theta_0 + (alpha + beta (step - s_0)) v`` per tensor, as a new state dict.

        Computed in float64 and rounded once to each tensor's dtype (round to nearest even). Steps
        inside the observed window interpolate, later steps extrapolate; steps before the base are
        refused (the line was fit forward from theta_0). Unchanged and copied tensors, and the
        elements no checkpoint moved, are returned bit-identical to the base.
        """
        if not math.isfinite(step) or step < self.base_step:
            raise ValueError(f"predict step {step} is before the base step {self.base_step} (or not finite)")
        offset = float(step - self.base_step)
        return {name: self._predict_tensor(fit, offset) for name, fit in self.tensors.items()}

    def _predict_tensor(self, fit: TensorFit, offset: float) -> Tensor:
        if fit.kind != "fitted" or fit.direction is None:
            return fit.base.clone()
        coefficient = fit.coefficient(offset)
        out = torch.empty(fit.base.shape, dtype=fit.base.dtype, device=fit.base.device)
        flat_out, flat_base, flat_direction = out.view(-1), fit.base.reshape(-1), fit.direction.reshape(-1)
        for start in range(0, flat_base.numel(), self.chunk_elements):
            stop = start + self.chunk_elements
            base, direction = flat_base[start:stop], flat_direction[start:stop]
            value = _round_once(base.double() + coefficient * direction.double(), out.dtype)
            # An element no checkpoint moved has direction exactly 0: keep its bits (-0.0 + 0.0 would be +0.0).
            flat_out[start:stop] = torch.where(direction == 0, base, value)
        return out

    def summary(self) -> dict[str, Any]:
        """Plain-Python (JSON-ready) description of the fit: per tensor its kind, shape, dtype, slope,
        intercept, coefficients, explained fraction and line residual; overall, the counts per kind
        and the explained fraction weighted by the squared delta norms (``sum lambda_1 / sum trace``).
        """
        per_tensor: dict[str, dict[str, Any]] = {}
        counts = {"fitted": 0, "unchanged": 0, "copied": 0}
        eigen_total = trace_total = 0.0
        for name, fit in self.tensors.items():
            counts[fit.kind] += 1
            eigen_total += fit.top_eigenvalue
            trace_total += fit.gram_trace
            per_tensor[name] = {
                "kind": fit.kind,
                "shape": list(fit.base.shape),
                "dtype": str(fit.base.dtype).removeprefix("torch."),
                "explained_fraction": fit.explained_fraction,
                "slope": fit.beta,
                "intercept": fit.alpha,
                "coefficients": list(fit.coefficients),
                "line_residual_rms": fit.line_residual_rms,
                "delta_norms": list(fit.delta_norms),
            }
        return {
            "method": "RELEX rank-1 linear extrapolation (arXiv 2605.21468)",
            "base_step": self.base_step,
            "steps": list(self.steps),
            "tensor_counts": counts,
            "explained_fraction": eigen_total / trace_total if trace_total > 0 else 1.0,
            "tensors": per_tensor,
        }


def fit_trajectory(
    checkpoints: Sequence[tuple[int, Mapping[str, Tensor]]],
    *,
    names: Iterable[str] | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> TrajectoryFit:
    """Fit RELEX to ``(step, state_dict)`` pairs sorted by step; the first is the base theta_0.

    ``names`` restricts the fit to those tensors (the others are copied from the base). Every
    checkpoint must hold the same tensor names with the same shapes and dtypes, steps must increase
    strictly, and no floating tensor may hold NaN or inf: otherwise ``ValueError``. Each
    checkpoint's ``state_dict[name]`` is read once (so lazily loaded checkpoints, see
    :func:`open_checkpoint`, hold one tensor per checkpoint in memory at a time).
    """
    if len(checkpoints) < 2:
        raise ValueError(f"RELEX needs at least 2 checkpoints (a base and one later step), got {len(checkpoints)}")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
    steps = tuple(_as_step(step) for step, _ in checkpoints)
    for earlier, later in itertools.pairwise(steps):
        if later <= earlier:
            raise ValueError(f"checkpoint steps must increase strictly, got {list(steps)}")
    states = [state for _, state in checkpoints]
    tensor_names = list(states[0].keys())
    base_names = set(tensor_names)
    for step, state in zip(steps[1:], states[1:], strict=True):
        other = set(state.keys())
        if other != base_names:
            missing, extra = sorted(base_names - other), sorted(other - base_names)
            raise ValueError(
                f"checkpoint at step {step} does not hold the base's tensors: "
                f"missing {_preview(missing)}, extra {_preview(extra)}"
            )
    selected = base_names if names is None else set(names)
    unknown = selected - base_names
    if unknown:
        raise ValueError(f"names not in the checkpoints: {_preview(sorted(unknown))}")

    fits: dict[str, TensorFit] = {}
    for name in tensor_names:
        tensors = [state[name] for state in states]
        _check_tensors(name, tensors, steps)
        base = tensors[0].detach()
        if name not in selected or not base.is_floating_point():
            fits[name] = TensorFit(kind="copied", base=base.clone())
        else:
            fits[name] = _fit_tensor(tensors, steps, chunk_elements)
    return TrajectoryFit(steps=steps, tensors=fits, chunk_elements=chunk_elements)


def _fit_tensor(tensors: list[Tensor], steps: tuple[int, ...], chunk_elements: int) -> TensorFit:
    base = tensors[0].detach()
    flats = [tensor.detach().reshape(-1) for tensor in tensors]
    numel = flats[0].numel()
    rows = len(flats) - 1

    # Pass 1: G = M M^T, accumulated over column chunks of M (float64 throughout).
    gram = torch.zeros(rows, rows, dtype=torch.float64, device=base.device)
    buffer = torch.empty(rows, min(numel, chunk_elements), dtype=torch.float64, device=base.device)
    for start in range(0, numel, chunk_elements):
        deltas = _delta_chunk(flats, start, start + chunk_elements, buffer)
        gram += deltas @ deltas.T
    trace = float(gram.trace())
    if trace == 0.0:
        # Bitwise the same in every checkpoint (up to the sign of zeros): nothing to extrapolate.
        zeros = (0.0,) * len(flats)
        return TensorFit(kind="unchanged", base=base.clone(), coefficients=zeros, delta_norms=zeros)

    eigenvalues, eigenvectors = torch.linalg.eigh(gram)  # ascending
    top_eigenvalue = float(eigenvalues[-1])
    u = eigenvectors[:, -1]
    # ||M^T u||^2 = u^T G u: the norm is known before M^T u is formed, so one more pass both writes
    # the unit direction and projects the deltas on the *stored* (rounded) direction.
    norm = math.sqrt(float(u @ gram @ u))

    # Pass 2: v = M^T u / ||M^T u||, stored; a = M v with the stored v.
    direction_dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    direction = torch.empty(numel, dtype=direction_dtype, device=base.device)
    projections = torch.zeros(rows, dtype=torch.float64, device=base.device)
    for start in range(0, numel, chunk_elements):
        stop = start + chunk_elements
        deltas = _delta_chunk(flats, start, stop, buffer)
        direction[start:stop] = (u @ deltas) / norm
        projections += deltas @ direction[start:stop].double()

    offsets = [float(step - steps[0]) for step in steps]
    coefficients = [0.0, *projections.tolist()]
    alpha, beta = _least_squares_line(offsets, coefficients)
    if beta < 0 or (beta == 0 and sum(coefficients) < 0):
        # Sign convention: v points the way the tensor moves (negation is exact).
        direction.neg_()
        coefficients = [-a for a in coefficients]
        alpha, beta = -alpha, -beta
    residuals = [a - (alpha + beta * x) for x, a in zip(offsets, coefficients, strict=True)]
    return TensorFit(
        kind="fitted",
        base=base.clone(),
        direction=direction.view(base.shape),
        alpha=alpha,
        beta=beta,
        explained_fraction=min(1.0, top_eigenvalue / trace),
        coefficients=tuple(coefficients),
        line_residual_rms=math.sqrt(sum(r * r for r in residuals) / len(residuals)),
        top_eigenvalue=top_eigenvalue,
        gram_trace=trace,
        delta_norms=(0.0, *gram.diagonal().sqrt().tolist()),
    )


def _delta_chunk(flats: list[Tensor], start: int, stop: int, buffer: Tensor) -> Tensor:
    """Rows ``theta_t[start:stop] - theta_0[start:stop]`` for t >= 1 in float64 (exact for bf16, fp16
    and fp32 values of similar magnitude), written into (a leading slice of) the reused ``buffer``."""
    base = flats[0][start:stop].double()
    deltas = buffer[:, : base.numel()]
    for row, flat in zip(deltas, flats[1:], strict=True):
        row.copy_(flat[start:stop]).sub_(base)
    return deltas


def _least_squares_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """``(alpha, beta)`` minimising ``sum (y - alpha - beta x)^2`` (the xs are distinct, so defined)."""
    x_mean, y_mean = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - x_mean) ** 2 for x in xs)
    sxy = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True))
    beta = sxy / sxx
    return y_mean - beta * x_mean, beta


def _round_once(value: Tensor, dtype: torch.dtype) -> Tensor:
    """Round float64 ``value`` to ``dtype`` to nearest even, with a single rounding.

    torch converts float64 to bf16/fp16 through float32, which rounds twice (``1 + 2**-8 + 2**-30``
    becomes 1.0, not 1 + 2**-7). Rounding to float32 *to odd* first (truncate, then set the lowest
    bit if anything was dropped) keeps the information a tie needs, so the second, nearest-even
    rounding equals a single one: valid because float32 has more than 2 bits more precision than
    any narrower float.
    """
    if dtype in (torch.float64, torch.float32) or not dtype.is_floating_point:
        return value.to(dtype)
    nearest = value.float()
    inexact = nearest.double() != value
    # int32 view of a float: +-1 on the bits moves the magnitude by one ulp, for either sign.
    bits = nearest.view(torch.int32)
    away = inexact & (nearest.double().abs() > value.abs())
    odd = (bits - away.to(torch.int32)) | inexact.to(torch.int32)
    return odd.view(torch.float32).to(dtype)


def _check_tensors(name: str, tensors: list[Tensor], steps: tuple[int, ...]) -> None:
    base = tensors[0]
    for step, tensor in zip(steps, tensors, strict=True):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"tensor {name!r} at step {step} is a {type(tensor).__name__}, not a torch.Tensor")
        if tensor.shape != base.shape or tensor.dtype != base.dtype:
            raise ValueError(
                f"tensor {name!r} differs between checkpoints: {tuple(base.shape)} {base.dtype} at step "
                f"{steps[0]}, {tuple(tensor.shape)} {tensor.dtype} at step {step}"
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"tensor {name!r} holds NaN or inf values in the checkpoint at step {step}")


def _as_step(step: Any) -> int:
    if isinstance(step, bool) or int(step) != step:
        raise ValueError(f"steps must be integers, got {step!r}")
    return int(step)


def _preview(items: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(item) for item in items[:limit])
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"[{shown}{more}]"


# ----------------------------------------------------------------------------------------------
# Loading checkpoints
# ----------------------------------------------------------------------------------------------


class SafetensorsCheckpoint(Mapping[str, Tensor]):
    """A lazily read checkpoint: ``checkpoint[name]`` reads that tensor from its safetensors file.

    Opened by :func:`open_checkpoint`; keeps the files open (memory-mapped) while it lives.
    """

    def __init__(self, files: Sequence[Path]) -> None:
        from safetensors import safe_open

        self.files = list(files)
        self._handles = [safe_open(str(path), framework="pt") for path in self.files]
        self._where: dict[str, Any] = {}
        for path, handle in zip(self.files, self._handles, strict=True):
            for name in handle.keys():
                if name in self._where:
                    raise ValueError(f"tensor {name!r} appears in more than one shard ({path})")
                self._where[name] = handle

    def __getitem__(self, name: str) -> Tensor:
        return self._where[name].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _weight_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file")
        return [path]
    if path.is_dir():
        if (path / _WEIGHTS_FILE).is_file():
            return [path / _WEIGHTS_FILE]
        if (path / _WEIGHTS_INDEX).is_file():
            weight_map = json.loads((path / _WEIGHTS_INDEX).read_text())["weight_map"]
            return [path / shard for shard in sorted(set(weight_map.values()))]
        raise ValueError(f"{path} holds neither {_WEIGHTS_FILE} nor {_WEIGHTS_INDEX}")
    raise ValueError(f"{path} does not exist")


def open_checkpoint(path: str | Path) -> SafetensorsCheckpoint:
    """Open a checkpoint lazily: a ``.safetensors`` file, or a directory holding ``model.safetensors``
    (or a sharded ``model.safetensors.index.json``), as HF/TRL write ``output/checkpoint-<N>``."""
    return SafetensorsCheckpoint(_weight_files(path))


def load_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read every tensor of a checkpoint (same paths as :func:`open_checkpoint`) into a state dict."""
    checkpoint = open_checkpoint(path)
    return {name: checkpoint[name] for name in checkpoint}


def step_from_path(path: str | Path) -> int | None:
    """The step ``N`` of a ``checkpoint-<N>`` directory, ``checkpoint-<N>.safetensors`` file or
    ``checkpoint-<N>/model.safetensors`` file; ``None`` if the name carries no step."""
    path = Path(path)
    if path.name == _WEIGHTS_FILE:
        path = path.parent
    name = path.name.removesuffix(".safetensors")
    match = _CHECKPOINT_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-rl-optim-relex",
        description=(
            "RELEX: extrapolate weights from K checkpoints along each tensor's rank-1 temporal subspace "
            "(arXiv 2605.21468). The checkpoint with the lowest step is the base theta_0."
        ),
    )
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="CKPT",
        help="a .safetensors file, or a directory holding model.safetensors (e.g. output/checkpoint-10)",
    )
    parser.add_argument("--predict-step", type=int, required=True, help="the step to predict the weights at")
    parser.add_argument(
        "--out",
        required=True,
        help="OUT.safetensors, or a directory: then OUT/model.safetensors plus the config and tokenizer "
        "files of the last checkpoint directory (loadable with from_pretrained)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        metavar="STEP",
        help="the step of each CKPT, in order (strictly increasing); default: parsed from checkpoint-<N> "
        "names, and the checkpoints sorted by it",
    )
    parser.add_argument("--summary", help="write the per-tensor fit summary here (JSON)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``sparse-rl-optim-relex CKPT [CKPT ...] --predict-step N --out OUT [--steps ...] [--summary S]``."""
    parser = _parser()
    args = parser.parse_args(argv)
    paths = [Path(path) for path in args.checkpoints]
    if len(paths) < 2:
        parser.error(f"need at least 2 checkpoints (a base and one later step), got {len(paths)}")

    if args.steps is not None:
        if len(args.steps) != len(paths):
            parser.error(f"--steps gives {len(args.steps)} steps for {len(paths)} checkpoints")
        steps = list(args.steps)
        if any(later <= earlier for earlier, later in itertools.pairwise(steps)):
            parser.error(f"--steps must increase strictly (in the order of the checkpoints), got {steps}")
    else:
        parsed = [step_from_path(path) for path in paths]
        unnamed = [str(path) for path, step in zip(paths, parsed, strict=True) if step is None]
        if unnamed:
            parser.error(f"cannot read a step from {', '.join(unnamed)} (not checkpoint-<N>): pass --steps")
        steps = [step for step in parsed if step is not None]
        if len(set(steps)) != len(steps):
            parser.error(f"two checkpoints have the same step: {sorted(steps)}")
        # Shell globs sort checkpoint-10 before checkpoint-5: order by the parsed step instead.
        order = sorted(range(len(paths)), key=lambda index: steps[index])
        paths, steps = [paths[index] for index in order], [steps[index] for index in order]
    if args.predict_step < steps[0]:
        parser.error(f"--predict-step {args.predict_step} is before the base step {steps[0]}")

    out = Path(args.out)
    out_file = out if out.suffix == ".safetensors" else out / _WEIGHTS_FILE
    try:
        files = [_weight_files(path) for path in paths]
        if any(out_file.resolve() == file.resolve() for group in files for file in group):
            parser.error(f"--out {out} would overwrite an input checkpoint")
        checkpoints = [(step, SafetensorsCheckpoint(group)) for step, group in zip(steps, files, strict=True)]
        fit = fit_trajectory(checkpoints)
    except ValueError as error:
        parser.error(str(error))

    from safetensors.torch import save_file

    predicted = fit.predict(args.predict_step)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    metadata = {
        "format": "pt",  # transformers' from_pretrained expects it
        "relex_predict_step": str(args.predict_step),
        "relex_steps": json.dumps(steps),
    }
    save_file({name: tensor.contiguous() for name, tensor in predicted.items()}, str(out_file), metadata=metadata)
    if out_file is not out and paths[-1].is_dir():
        for extra in sorted(paths[-1].iterdir()):
            if extra.is_file() and extra.suffix not in _NOT_COPIED_SUFFIXES and extra.name not in _NOT_COPIED_NAMES:
                shutil.copy2(extra, out / extra.name)

    summary = fit.summary()
    if args.summary:
        report = {"predict_step": args.predict_step, "checkpoints": [str(path) for path in paths], "out": str(out_file)}
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps({**report, **summary}, indent=2) + "\n")
    counts = summary["tensor_counts"]
    print(
        f"RELEX: steps {steps} -> step {args.predict_step}: {counts['fitted']} tensors extrapolated, "
        f"{counts['unchanged']} unchanged, {counts['copied']} copied; explained fraction "
        f"{summary['explained_fraction']:.4f}; wrote {out_file}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
