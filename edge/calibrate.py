"""Calibrating tau: "what threshold do I set?" answered on the operator's own questions.

``observe`` runs every question through the edge once, with the gate told
never to exit (tau > 1), so that each question yields its ``S``, the edge's
answer and, when a cloud is configured, the cloud's answer to the same
escalation. ``sweep`` then replays any threshold without running a model
again: the questions with ``S >= tau`` exit on the edge, the rest take the
cloud's answer. For each tau it reports the exit rate, the relative cloud load
(1 - exit rate), the agreement of the cascade's final answer with the cloud
alone, and the accuracy when the questions carry labels. ``pick`` chooses the
tau that meets a target (an exit rate, or an agreement / accuracy floor) with
the most exits; ``save`` writes it beside the export (``stitch_calibration.json``),
where ``stitch-edge ask`` and ``read_calibration`` find it.

Torch-free, like the rest of the edge. It does not change the gate: the same
``S`` the SDK computes, the same ``>=`` comparison.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from stitchvlm.shared.synthetic import exact_match

from .runtime import EdgeModel
from .sdk import Cascade, CascadeConfig

CALIBRATION_FILE = "stitch_calibration.json"  # in the export directory, beside stitch_edge.json
NEVER_EXIT = math.inf  # a tau no S reaches: every question escalates (when a cloud is configured)


@dataclass(frozen=True)
class Observation:
    """What one question gave with the gate held open."""

    s: float  # the SEE score S of the edge's answer
    edge_answer: str
    cloud_answer: str | None  # None without a cloud, or when it failed
    label: str | None  # the expected answer, when the question set has one


@dataclass(frozen=True)
class SweepRow:
    """The cascade's behaviour on the observed questions at one threshold."""

    tau: float
    exit_rate: float  # share answered on the edge (S >= tau)
    cloud_load: float  # share sent to the cloud, relative to sending every question
    agreement: float | None  # share whose final answer equals the cloud's own (None without a cloud)
    accuracy: float | None  # share whose final answer matches the label (None without labels + cloud)
    edge_accuracy_on_exits: float | None  # label accuracy of the edge's answers that exited


def observe(cascade: Cascade, questions: Iterable[tuple[object, str, str | None]]) -> list[Observation]:
    """(image, prompt, label or None) per question -> observations, the cloud asked for each."""
    out = []
    for image, prompt, label in questions:
        result = cascade.ask(image, prompt)
        cloud = result.cloud_reply.text if result.cloud_reply is not None else None
        out.append(Observation(s=result.s, edge_answer=result.edge_answer, cloud_answer=cloud, label=label))
    return out


def thresholds(observations: Sequence[Observation]) -> list[float]:
    """Every tau at which the set of exiting questions changes, plus 0 (all exit) and one above all."""
    values = sorted({0.0, *(o.s for o in observations)})
    return [*values, max(1.0, values[-1]) + 1e-6]


def sweep(observations: Sequence[Observation], taus: Sequence[float] | None = None) -> list[SweepRow]:
    """The cascade's exit rate, agreement and accuracy at each tau (default: ``thresholds``)."""
    if not observations:
        raise ValueError("no observations to calibrate on")
    n = len(observations)
    have_cloud = all(o.cloud_answer is not None for o in observations)
    have_labels = all(o.label is not None for o in observations)
    rows = []
    for tau in taus if taus is not None else thresholds(observations):
        exits = [o.s >= tau for o in observations]
        finals = [o.edge_answer if e else o.cloud_answer for o, e in zip(observations, exits, strict=True)]
        exited = [o for o, e in zip(observations, exits, strict=True) if e]
        rows.append(
            SweepRow(
                tau=tau,
                exit_rate=sum(exits) / n,
                cloud_load=1.0 - sum(exits) / n,
                agreement=(
                    sum(f == o.cloud_answer for f, o in zip(finals, observations, strict=True)) / n
                    if have_cloud
                    else None
                ),
                accuracy=(
                    sum(exact_match(f, o.label) for f, o in zip(finals, observations, strict=True)) / n
                    if have_cloud and have_labels
                    else None
                ),
                edge_accuracy_on_exits=(
                    sum(exact_match(o.edge_answer, o.label) for o in exited) / len(exited)
                    if have_labels and exited
                    else None
                ),
            )
        )
    return rows


def pick(rows: Sequence[SweepRow], target: str, value: float) -> SweepRow:
    """The threshold for a target, with the most exits (lowest tau) among those that meet it.

    ``target``: "exit_rate" (exit at most ``value`` of the questions, as close to it as the
    observations allow), "agreement" or "accuracy" (at least ``value``).
    """
    if target == "exit_rate":
        meeting = [r for r in rows if r.exit_rate <= value + 1e-12]
    elif target in ("agreement", "accuracy"):
        if getattr(rows[0], target) is None:
            raise ValueError(f"target {target} needs {'a cloud' if target == 'agreement' else 'labels and a cloud'}")
        meeting = [r for r in rows if getattr(r, target) >= value - 1e-12]
    else:
        raise ValueError(f"unknown target {target!r}; expected exit_rate, agreement or accuracy")
    if not meeting:
        raise ValueError(f"no threshold reaches {target} {value} on these questions")
    return max(meeting, key=lambda r: (r.exit_rate, -r.tau))


@dataclass(frozen=True)
class Calibration:
    """A chosen tau and the evidence behind it, as ``save`` writes it."""

    tau: float
    target: str  # what it was picked for: exit_rate | agreement | accuracy
    target_value: float
    questions: int
    retention: float  # R the cloud answers were obtained with
    chosen: SweepRow
    sweep: list[SweepRow]
    # What S depended on (None in files written before they were recorded): the gate's r_c, the
    # generation budget and the grid tiles per image the edge really cut (its --max-tiles cap or
    # the checkpoint's max_tiles). Another value gives other S, so the tau no longer means the same.
    consistency_retention: float | None = None
    max_new_tokens: int | None = None
    max_tiles: int | None = None


# Calibration field -> the stitch-edge flag that sets it, for the settings that change S.
S_SETTINGS = {
    "consistency_retention": "--consistency-retention",
    "max_new_tokens": "--max-new-tokens",
    "max_tiles": "--max-tiles",
}


def settings_of(config: CascadeConfig, model: EdgeModel) -> dict[str, object]:
    """A run's values of the settings in ``S_SETTINGS``; the tiles are the ones the edge really
    cuts, its cap or the checkpoint's own."""
    return {
        "consistency_retention": config.consistency_retention,
        "max_new_tokens": config.max_new_tokens,
        "max_tiles": model.files.tiling.max_tiles,
    }


def differences(calibration: Calibration, settings: dict[str, object]) -> list[str]:
    """The settings that change S (``S_SETTINGS``) whose value in ``settings`` differs from the
    calibration's, as "--flag: calibrated A, now B"; settings the file does not record are skipped."""
    return [
        f"{flag}: calibrated {getattr(calibration, name)}, now {settings[name]}"
        for name, flag in S_SETTINGS.items()
        if getattr(calibration, name) is not None and getattr(calibration, name) != settings[name]
    ]


def save(calibration: Calibration, path: Path) -> Path:
    data = asdict(calibration)
    path.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return path


def read_calibration(path: Path) -> Calibration | None:
    """The calibration in ``path`` (an export directory or the file itself); None when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:  # a file cut short or edited by hand
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    try:
        rows = [SweepRow(**row) for row in data["sweep"]]
        return Calibration(**{**data, "chosen": SweepRow(**data["chosen"]), "sweep": rows})
    except (KeyError, TypeError) as error:
        raise ValueError(f"{path}: not a stitch calibration file ({error})") from error


def table(rows: Sequence[SweepRow], chosen: SweepRow | None = None, limit: int = 25) -> str:
    """The sweep as markdown, thinned to about ``limit`` rows (the chosen one always shown)."""
    step = max(1, len(rows) // limit)
    shown = [r for i, r in enumerate(rows) if i % step == 0 or r == chosen or i == len(rows) - 1]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [
        "| tau | exit rate | cloud load | agreement with cloud | accuracy | edge accuracy on exits |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in shown:
        mark = " **<-**" if r == chosen else ""
        lines.append(
            f"| {r.tau:.4f}{mark} | {r.exit_rate:.3f} | {r.cloud_load:.3f} | {fmt(r.agreement)} | "
            f"{fmt(r.accuracy)} | {fmt(r.edge_accuracy_on_exits)} |"
        )
    return "\n".join(lines)
