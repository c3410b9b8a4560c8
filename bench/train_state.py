"""Checkpoints of a training run in progress, so that ``bench/train_pair.py --resume`` continues it.

A checkpoint holds the weights (model and grounding heads), the optimizer's state,
torch's RNG and ``Progress``; resuming from it reproduces the uninterrupted run
(the data stream is a pure function of the step). It is not a Hugging Face
checkpoint: ``save_checkpoint`` writes those at the end.
"""

from __future__ import annotations

import os
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
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return Progress(**state["progress"])
