"""Checkpoints of a training run in progress, so that ``bench/train_pair.py --resume`` continues it.

A checkpoint holds the weights (model and grounding heads), the optimizer's state,
torch's RNG and ``Progress``; resuming from it reproduces the uninterrupted run
(the data stream is a pure function of the step). It is not a Hugging Face
checkpoint: ``save_checkpoint`` writes those at the end.

A run's working directory (``runs/``) is not kept from one session to the next,
so a run longer than a session is carried over in git as a *portable* checkpoint:
the same file without the optimizer's moments (a third of the size)::

    python bench/train_state.py portable runs/x/ck/crowded-large.pt bench/checkpoints/crowded-large.pt

``--resume`` takes either kind. From a portable one, AdamW starts with fresh
moments and the learning rate ramps up again from zero over ``REWARM_STEPS``
(``rewarm_scale``); the run goes on from there but no longer ends bit-for-bit at
the uninterrupted run's weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Progress:
    """Where a training run stands: what a checkpoint holds beside the weights and optimizer."""

    step: int = 0  # optimizer steps done
    seconds: float = 0.0  # training time of the runs so far (wall clock, this run's included)
    first_loss: float | None = None  # answer loss of step 1
    means: dict[str, float] | None = None  # RunningMeans.values
    history: list[dict] | None = None  # one entry per validation check
    # Step at which a resume from a portable checkpoint started AdamW afresh (None: never). Kept
    # through later checkpoints, so that a resume inside the ramp continues it.
    rewarm_from: int | None = None


# Steps over which the learning rate ramps from 0 to its schedule after a resume from a portable
# checkpoint: fresh AdamW moments (beta2 0.98 averages over ~50 steps) make the first updates about
# lr-sized in every coordinate, whatever their gradients' history.
REWARM_STEPS = 100


def rewarm_scale(step: int, progress: Progress) -> float:
    """The factor on step ``step``'s scheduled learning rate: 1, or the ramp after a portable resume."""
    if progress.rewarm_from is None:
        return 1.0
    return min(1.0, (step - progress.rewarm_from + 1) / REWARM_STEPS)


def save_state(path: Path, trained: torch.nn.Module, optimizer, progress: Progress, identity: dict) -> None:
    """One checkpoint: weights (model and grounding heads), optimizer, progress, torch's RNG and
    ``identity`` (config and preset, which a resume must match). Written whole, then renamed,
    so a kill mid-write leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "trained": trained.state_dict(),
        "optimizer": optimizer.state_dict(),
        "progress": asdict(progress),
        "torch_rng": torch.get_rng_state(),
        "identity": identity,
    }
    _save_whole(state, path)


def _save_whole(state: dict, path: Path) -> None:
    """``torch.save`` to a scratch file beside ``path``, then renamed: never half a checkpoint."""
    scratch = path.with_name(path.name + ".partial")
    torch.save(state, scratch)
    os.replace(scratch, path)


def load_state(
    path: Path,
    trained: torch.nn.Module,
    optimizer,
    identity: dict,
    prefix: dict | None = None,
    prefix_until: int = 0,
) -> Progress:
    """Restore what ``save_state`` wrote; refuses a checkpoint of another config or preset, except one
    of the run ``prefix`` (whose steps up to ``prefix_until`` are this run's: an extended schedule)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    saved, step = state["identity"], state["progress"]["step"]
    if saved != identity and not (saved == prefix and step <= prefix_until):
        changed = sorted(k for k in identity if saved.get(k) != identity[k])
        raise ValueError(f"{path} was written by another run ({', '.join(changed)} differ); not resuming")
    trained.load_state_dict(state["trained"])
    progress = Progress(**state["progress"])
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    else:  # portable: fresh moments, a new ramp
        progress.rewarm_from = progress.step
    torch.set_rng_state(state["torch_rng"])
    return progress


def make_portable(source: Path, target: Path) -> int:
    """Write ``source``'s checkpoint without the optimizer's state to ``target``; returns its step."""
    state = torch.load(source, map_location="cpu", weights_only=False)
    if "optimizer" not in state:
        raise ValueError(f"{source} is already portable")
    del state["optimizer"]
    target.parent.mkdir(parents=True, exist_ok=True)
    _save_whole(state, target)
    return state["progress"]["step"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Checkpoints of a training run: make one portable.")
    commands = parser.add_subparsers(dest="command", required=True)
    portable = commands.add_parser("portable", help="copy a checkpoint without the optimizer's state")
    portable.add_argument("source", type=Path)
    portable.add_argument("target", type=Path)
    args = parser.parse_args(argv)
    try:
        step = make_portable(args.source, args.target)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    megabytes = args.target.stat().st_size / 2**20
    print(f"{args.target}: step {step}, {megabytes:.1f} MB, no optimizer state")
    return 0


if __name__ == "__main__":
    sys.exit(main())
