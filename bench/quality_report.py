"""The quality benchmark's columns, tables and plots (``bench/quality.py`` runs it).

The method tables say which columns a run has (``key`` names them); ``markdown``
and ``plot`` render a ``summarize``d run. Nothing here runs a model. ``config``
is the run's ``QualityConfig`` (read for K, the family and labels only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from stitchvlm.shared.synthetic import family_qtypes

if TYPE_CHECKING:  # annotations only: quality.py imports this module
    from quality import QualityConfig

RETENTIONS = (0.64, 0.35, 0.09)
# method -> what the table calls it; every method runs at every R in RETENTIONS
PRUNED_METHODS = {
    "sgp": "SGP: small model's A, K",
    "sgp_prefill": "SGP: small model's A^P only, K",
    "sgp_k0": "SGP: small model's A, K = 0",
    "fastv": "FastV: large model's layer K-1 attention, K",
    "random": "random tokens, K",
    "oracle": "oracle: large model's own A, K",
}
# The paper's operating points on the 48-layer InternVL2-26B: name -> (K / 48, r).
PAPER_POINTS = {"p9": (2 / 48, 0.05), "p35": (9 / 48, 0.20), "p64": (19 / 48, 0.40)}
PAPER_METHODS = {
    "sgp": "SGP: small model's A",
    "sgp_prefill": "SGP: small model's A^P only",
    "fastv": "FastV: large model's layer K-1 attention",
    "random": "random tokens",
    "oracle": "oracle: large model's own A",
    "scene": "scene: the question's region, then the oracle's order",
}
RANKED_METHODS = ("sgp", "sgp_prefill", "fastv", "random")  # compared with the oracle's ranking
LIFTED_METHODS = ("sgp", "sgp_prefill", "fastv", "oracle")  # whose concentration on the region is shown
GATES = ("combined", "confidence", "consistency")
CURVE = ("tau", "exit_rate", "accuracy", "relative_compute")  # what a SEE curve lists per point


def key(method: str, retention: float) -> str:
    """``sgp``, 0.09 -> ``sgp_r9``: the name of one (method, R) column."""
    return f"{method}_r{round(100 * retention)}"


# ----------------------------------------------------------------------------- tables and plots

TAU_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def at_tau(curve: dict, tau: float) -> int:
    """Index of the sweep point that threshold ``tau`` lands on (gate >= tau <=> gate >= next distinct value)."""
    return int(np.searchsorted(np.asarray(curve["tau"]), tau, side="left"))


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def markdown(summary: dict, config: QualityConfig, meta: dict) -> str:
    acc, large = summary["accuracy"], summary["accuracy"]["large"]
    k = config.prune_layer
    lines = [
        "# Quality on the synthetic test split",
        "",
        f"n = {summary['n']} (test split, seed {config.seed}); small = `{config.small_dir.name}` on ONNX Runtime "
        f"(CPU EP), large = `{config.large_dir.name}` in PyTorch (eager attention); greedy, exact match, "
        f"max {config.max_new_tokens} new tokens; K = {k}. `bench/quality.py`, {meta['date']}, "
        f"{meta['seconds'] / 60:.1f} min.",
        "",
        "| model | accuracy % |",
        "| --- | ---: |",
        f"| large, all visual tokens | {pct(large)} |",
        f"| small, all visual tokens | {pct(acc['small'])} |",
        *paper_markdown(summary, config),
        "",
        f"## Large model with R of its visual tokens kept from layer K = {k} (fixed K, kept fraction R)",
        "",
        "Accuracy %, in parentheses the share of the unpruned large model's accuracy.",
        "",
        "| kept tokens chosen by | " + " | ".join(f"R = {round(100 * r)}%" for r in RETENTIONS) + " |",
        "| --- | " + " | ".join("---:" for _ in RETENTIONS) + " |",
    ]
    for method, label in PRUNED_METHODS.items():
        cells = []
        for r in RETENTIONS:
            value = acc[key(method, r)]
            share = f" ({100 * value / large:.0f}%)" if large > 0 else ""
            cells.append(f"{pct(value)}{share}")
        label = label if label.endswith("K = 0") else label.replace(", K", f", K = {k}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *verdict(acc)]
    for title, suffix in ((f"R = 9%, K = {k}", "r9"), ("the paper's 9% point", "p9")):
        methods = ("sgp", "sgp_prefill", "fastv", "random", "oracle", "scene")  # scene: the points only
        shown = ["large", "small", *(f"{m}_{suffix}" for m in methods if f"{m}_{suffix}" in acc)]
        lines += ["", f"## Per question type at {title}", "", *per_qtype_table(summary, config, shown)]
    lines += see_markdown(summary, config)
    return "\n".join(lines) + "\n"


def per_qtype_table(summary: dict, config: QualityConfig, shown: Sequence[str]) -> list[str]:
    present = [q for q in family_qtypes(config.family) if q in summary["per_qtype"]["large"]]
    lines = ["| | " + " | ".join(present) + " |", "| --- | " + " | ".join("---:" for _ in present) + " |"]
    for name in shown:
        per = summary["per_qtype"][name]
        lines.append(f"| {name} | " + " | ".join(pct(per.get(q)) for q in present) + " |")
    return lines


def with_se(summary: dict, name: str) -> str:
    acc, large = summary["accuracy"], summary["accuracy"]["large"]
    share = f" ({100 * acc[name] / large:.0f}%)" if large > 0 else ""
    return f"{pct(acc[name])} ± {100 * summary['stderr'][name]:.1f}{share}"


def _captioned_head(caption: str, first: str, points, align: str) -> list[str]:
    """A blank line, ``caption``, a blank line and the head of a table with a column per point."""
    return [
        "",
        caption,
        "",
        f"| {first} | " + " | ".join(points) + " |",
        "| --- | " + " | ".join(align for _ in points) + " |",
    ]


def paper_markdown(summary: dict, config: QualityConfig) -> list[str]:
    """The paper's operating points: accuracy ± standard error, ranking agreement, SGP - FastV."""
    points = summary["points"]
    if not points:
        return []
    lines = [
        "",
        "## The paper's operating points (layer-averaged token ratio)",
        "",
        "K at the paper's fraction of the large model's depth (2/48, 9/48, 19/48 of its "
        f"{next(iter(points.values()))['num_layers']} layers, rounded, at least 1), r kept from layer K on; "
        "token ratio = (K + (L - K) k / |V|) / L; FLOPs relative to the unpruned large model (vision + prompt "
        "pass). Accuracy % ± standard error, in parentheses the share of the unpruned large model's accuracy.",
        "",
        "| kept tokens chosen by | "
        + " | ".join(
            f"{point}: K = {g['layer']}, r = {round(100 * g['retention'])}% ({g['kept']} of {g['num_visual']}), "
            f"ratio {100 * g['token_ratio']:.1f}%, FLOPs {g['flop_ratio']:.3f}"
            for point, g in points.items()
        )
        + " |",
        "| --- | " + " | ".join("---:" for _ in points) + " |",
        "| large, all visual tokens | " + " | ".join(with_se(summary, "large") for _ in points) + " |",
    ]
    for method, label in PAPER_METHODS.items():
        lines.append(f"| {label} | " + " | ".join(with_se(summary, f"{method}_{p}") for p in points) + " |")
    lines += _captioned_head(
        "Ranking agreement with the oracle (the large model's own A): overlap of the top-r sets "
        "(share of the oracle's k tokens also kept) / Spearman rank correlation over all |V| tokens, "
        "mean ± standard error over examples.",
        "ranking",
        points,
        "---",
    )
    ranking = summary["ranking"]
    for method in RANKED_METHODS:
        cells = []
        for p in points:
            o, r = ranking[f"overlap_{method}_{p}"], ranking[f"spearman_{method}_{p}"]
            cells.append(f"{o['mean']:.3f} ± {o['se']:.3f} / {r['mean']:.3f} ± {r['se']:.3f}")
        lines.append(f"| {PAPER_METHODS[method]} | " + " | ".join(cells) + " |")
    if any(name.startswith("region_") for name in ranking):
        lines += _captioned_head(
            "Against the scene: share of the visual tokens under the question's region (the object or "
            "objects its answer is read from) that the top-r set keeps, mean ± standard error (random "
            "keeps k / |V| of them on average).",
            "kept tokens chosen by",
            points,
            "---:",
        )
        for method in (*RANKED_METHODS, "oracle"):
            cells = [
                f"{ranking[f'region_{method}_{p}']['mean']:.3f} ± {ranking[f'region_{method}_{p}']['se']:.3f}"
                for p in points
            ]
            lines.append(f"| {PAPER_METHODS[method]} | " + " | ".join(cells) + " |")
    lines += lift_markdown(ranking, config.prune_layer)
    lines.append("")
    for p, d in summary["paired"].items():
        relation = (
            "above" if d["sgp_minus_fastv"] > 0 else ("level with" if d["sgp_minus_fastv"] == 0 else "below")
        )
        lines.append(
            f"- {p}: SGP {pct(summary['accuracy'][f'sgp_{p}'])} is {relation} FastV "
            f"{pct(summary['accuracy'][f'fastv_{p}'])}: difference {100 * d['sgp_minus_fastv']:+.1f} ± "
            f"{100 * d['se']:.1f} points (paired standard error)."
        )
    return lines


def lift_markdown(ranking: dict, prune_layer: int) -> list[str]:
    """How strongly each score, and each layer of the large model, prefers the question's region."""
    if "lift_oracle" not in ranking:
        return []
    lines = [
        "",
        "Concentration on the question's region: share of a score's mass on the region's tokens over "
        "the region's share of the tokens (1 = no preference), mean ± standard error over examples. "
        "Per layer: the large model's attention from the text after the image, summed over heads.",
        "",
        "| score | lift |",
        "| --- | ---: |",
    ]
    cell = "{mean:.2f} ± {se:.2f}"
    for method in LIFTED_METHODS:
        label = PAPER_METHODS[method] + (f", K = {prune_layer}" if method == "fastv" else "")
        lines.append(f"| {label} | {cell.format(**ranking[f'lift_{method}'])} |")
    layer = 0
    while f"lift_layer{layer}" in ranking:
        lines.append(f"| large model, layer {layer} | {cell.format(**ranking[f'lift_layer{layer}'])} |")
        layer += 1
    return lines


def verdict(acc: dict) -> list[str]:
    """One honest sentence per retention: does SGP beat FastV and random here?"""
    lines = []
    for r in RETENTIONS:
        sgp, fastv, rand = acc[key("sgp", r)], acc[key("fastv", r)], acc[key("random", r)]
        relation = "beats" if sgp > fastv else ("ties with" if sgp == fastv else "does NOT beat")
        lines.append(
            f"- R = {round(100 * r)}%: SGP {pct(sgp)} {relation} FastV {pct(fastv)} "
            f"(random {pct(rand)}, oracle {pct(acc[key('oracle', r)])}, A^P only {pct(acc[key('sgp_prefill', r)])})."
        )
    return lines


def see_markdown(summary: dict, config: QualityConfig) -> list[str]:
    costs, see = summary["costs"], summary["see"]
    r = config.cascade_retention
    lines = [
        "",
        f"## SEE cascade: small on the edge, else large + SGP at R = {round(100 * r)}%, K = {config.prune_layer}",
        "",
        "Exit when gate >= tau. Relative compute = (small + (1 - exit rate) x pruned large) / unpruned large,",
        "costs in FLOPs (FlopCounterMode; vision + prompt pass, and the small model's S_cons pass; decode left out):",
        f"small {costs['small'] / 1e9:.3f} GFLOP, large {costs['large'] / 1e9:.3f}, "
        + ", ".join(f"large at R = {round(100 * q)}% {costs[key('sgp', q)] / 1e9:.3f}" for q in RETENTIONS)
        + ".",
        "",
        f"Highest exit rate with cascade accuracy >= large - 1 point "
        f"({pct(max(0.0, summary['accuracy']['large'] - 0.01))}):",
        "",
        "| gate | escalate to | tau | exit rate % | cascade accuracy % | relative compute |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, curve in see.items():
        gate, target = name.split("/")
        best = curve["best"]
        where = f"large + SGP {round(100 * r)}%" if target == "pruned" else "large, all tokens"
        if best is None:
            lines.append(f"| {gate} | {where} | — | none reaches it | — | — |")
        else:
            lines.append(
                f"| {gate} | {where} | {best['tau']:.4g} | {pct(best['exit_rate'])} "
                f"| {pct(best['accuracy'])} | {best['relative_compute']:.3f} |"
            )
    lines += ["", "Fixed thresholds (escalations pruned):", ""]
    lines += ["| tau | " + " | ".join(f"{g}: exit / acc / compute" for g in GATES) + " |"]
    lines += ["| ---: | " + " | ".join("---" for _ in GATES) + " |"]
    for tau in TAU_GRID:
        cells = []
        for gate in GATES:
            curve = see[f"{gate}/pruned"]
            i = at_tau(curve, tau)
            cells.append(
                f"{pct(curve['exit_rate'][i])} / {pct(curve['accuracy'][i])} / {curve['relative_compute'][i]:.3f}"
            )
        lines.append(f"| {tau:.1f} | " + " | ".join(cells) + " |")
    return lines


def plot(summary: dict, config: QualityConfig, out_dir: Path) -> list[Path]:
    """quality_retention.png (accuracy vs R) and quality_see.png (cascade accuracy vs exit rate / compute)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    acc = summary["accuracy"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    xs = [100 * r for r in RETENTIONS]
    for method, label in PRUNED_METHODS.items():
        # "..., K" takes the run's K; "..., K = 0" names its own. A^P only and A draw over each other
        # when they keep the same tokens: dashed, so both show.
        label = label + f" = {config.prune_layer}" if label.endswith(", K") else label
        style = "--" if method == "sgp_prefill" else "-"
        ax.plot(xs, [100 * acc[key(method, r)] for r in RETENTIONS], marker="o", linestyle=style, label=label)
    ax.axhline(100 * acc["large"], color="black", linestyle="--", label="large, all tokens")
    ax.axhline(100 * acc["small"], color="gray", linestyle=":", label="small, all tokens")
    ax.set(
        xlabel="visual tokens kept, R %",
        ylabel="accuracy %",
        title=f"Large model pruned at K = {config.prune_layer}",
    )
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())  # only the R values are labelled
    ax.set_xticks(xs, [f"{x:.0f}" for x in xs])
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out_dir / "quality_retention.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    for gate in GATES:
        curve = summary["see"][f"{gate}/pruned"]
        left.step(
            100 * np.array(curve["exit_rate"]), 100 * np.array(curve["accuracy"]), where="post", label=gate
        )
        right.plot(curve["relative_compute"], 100 * np.array(curve["accuracy"]), label=gate)
    for axis in (left, right):
        axis.axhline(100 * acc["large"], color="black", linestyle="--", label="large, all tokens")
        axis.axhline(100 * acc["large"] - 1, color="black", linestyle=":", label="large - 1 point")
        axis.set_ylabel("cascade accuracy %")
        axis.legend(fontsize=7)
    left.set(xlabel="exit rate % (answered on the edge)", title="SEE gates")
    right.set(xlabel="compute relative to the unpruned large model (FLOPs)", title="Accuracy vs compute")
    fig.tight_layout()
    paths.append(out_dir / "quality_see.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    if summary["points"]:
        paths.append(plot_paper_points(summary, out_dir, plt))
    return paths


def plot_paper_points(summary: dict, out_dir: Path, plt) -> Path:
    """quality_paper.png: accuracy (± standard error) vs the layer-averaged token ratio of each point."""
    acc, se, points = summary["accuracy"], summary["stderr"], summary["points"]
    xs = [100 * g["token_ratio"] for g in points.values()]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, label in PAPER_METHODS.items():
        ys = [100 * acc[f"{method}_{p}"] for p in points]
        errors = [100 * se[f"{method}_{p}"] for p in points]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label)
    ax.axhline(100 * acc["large"], color="black", linestyle="--", label="large, all tokens")
    ax.axhline(100 * acc["small"], color="gray", linestyle=":", label="small, all tokens")
    ks = ", ".join(f"{p}: K = {g['layer']}, r = {round(100 * g['retention'])}%" for p, g in points.items())
    ax.set(
        xlabel="layer-averaged visual token ratio %", ylabel="accuracy %", title=f"The paper's points ({ks})"
    )
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / "quality_paper.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
