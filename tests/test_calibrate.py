"""``stitch-edge calibrate`` on the embedded pair: the replayed sweep against the cascade really run.

The calibration observes each question once and replays every threshold
without a model; the reference is the cascade itself, run again at the chosen
tau over the same questions: its exit rate, agreement with the cloud and
accuracy must be exactly what the sweep predicted. The CLI writes the file
that ``stitch-edge ask`` then reads its tau from.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

pytest.importorskip("torch")

from servers import running_cloud  # noqa: E402

from stitchvlm.cloud.engine import CloudEngine, EngineConfig  # noqa: E402
from stitchvlm.edge import calibrate  # noqa: E402
from stitchvlm.edge.cli import main as edge_main  # noqa: E402
from stitchvlm.edge.demo import EMBEDDED_LARGE, EMBEDDED_SMALL, embedded_model_dir  # noqa: E402
from stitchvlm.edge.export import ExportConfig, export_edge  # noqa: E402
from stitchvlm.edge.gate import DEFAULT_CONSISTENCY_RETENTION  # noqa: E402
from stitchvlm.edge.loadtest import load_questions  # noqa: E402
from stitchvlm.edge.runtime import CPU, EdgeModel  # noqa: E402
from stitchvlm.edge.sdk import Cascade  # noqa: E402
from stitchvlm.shared.synthetic import exact_match  # noqa: E402

N = 24
OPTIONS = dict(retention=0.09, max_new_tokens=6)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    small, large = embedded_model_dir(EMBEDDED_SMALL), embedded_model_dir(EMBEDDED_LARGE)
    if not (small / "config.json").is_file():
        pytest.skip("the embedded pair is not in shared/models")
    edge_dir = tmp_path_factory.mktemp("pair") / "small"
    export_edge(ExportConfig(model_dir=small, out_dir=edge_dir, verify=False))
    return edge_dir, large


@pytest.fixture(scope="module")
def questions():
    return load_questions("synthetic:val", N)


@pytest.fixture(scope="module")
def setup(pair, questions):
    edge_dir, large = pair
    edge = EdgeModel.load(edge_dir, providers=[CPU])
    engine = CloudEngine.load(EngineConfig(model_dir=large))
    sdk = Cascade(edge, engine, tau=calibrate.NEVER_EXIT, **OPTIONS)
    observations = calibrate.observe(sdk, ((q.image, q.prompt, q.answer) for q in questions))
    return edge, engine, observations


def test_sweep_predicts_what_the_cascade_does_at_the_chosen_tau(setup, questions):
    """Guards against a replay that compares S with tau differently from the gate (> vs >=),
    pairs the wrong cloud answer with a question, or mislabels the metrics."""
    edge, engine, observations = setup
    rows = calibrate.sweep(observations)
    assert rows[0].exit_rate == 1.0 and rows[-1].exit_rate == 0.0
    assert all(a.exit_rate >= b.exit_rate for a, b in zip(rows, rows[1:], strict=False))
    chosen = calibrate.pick(rows, "exit_rate", 0.5)
    assert chosen.exit_rate <= 0.5 and not any(chosen.exit_rate < r.exit_rate <= 0.5 for r in rows)
    assert chosen.exit_rate > 0.0, "the pair's S should spread over the questions"
    sdk = Cascade(edge, engine, tau=chosen.tau, **OPTIONS)
    results = [sdk.ask(q.image, q.prompt) for q in questions]
    cloud = [o.cloud_answer for o in observations]
    assert [r.route == "edge" for r in results] == [o.s >= chosen.tau for o in observations]
    assert sum(r.route == "edge" for r in results) / N == chosen.exit_rate
    assert sum(r.answer == c for r, c in zip(results, cloud, strict=True)) / N == chosen.agreement
    assert (
        sum(exact_match(r.answer, q.answer) for r, q in zip(results, questions, strict=True)) / N
        == chosen.accuracy
    )


def test_pick_takes_the_most_exits_that_meet_an_agreement_floor(setup):
    """The agreement target: the lowest tau (most exits) whose agreement reaches the floor."""
    _, _, observations = setup
    rows = calibrate.sweep(observations)
    chosen = calibrate.pick(rows, "agreement", 0.9)
    assert chosen.agreement >= 0.9
    assert all(r.exit_rate <= chosen.exit_rate for r in rows if r.agreement >= 0.9)
    with pytest.raises(ValueError, match="no threshold"):
        calibrate.pick(rows, "accuracy", 1.01)
    no_cloud = [calibrate.Observation(o.s, o.edge_answer, None, o.label) for o in observations]
    with pytest.raises(ValueError, match="needs a cloud"):
        calibrate.pick(calibrate.sweep(no_cloud), "agreement", 0.9)


def test_cli_writes_the_tau_that_ask_then_uses(pair, tmp_path, capsys):
    """``calibrate`` against a real server writes the file; ``ask`` without --tau reads it."""
    edge_dir, large = pair
    image = tmp_path / "q.png"
    image.write_bytes(load_questions("synthetic:test", 1)[0].image)
    with running_cloud(large) as server:
        code = edge_main(
            [
                "calibrate",
                "--model",
                str(edge_dir),
                "--questions",
                "synthetic:val",
                "-n",
                "10",
                "--cloud",
                server.address,
                "--target-agreement",
                "0.9",
                "--max-new-tokens",
                "6",
                "--cpu",
            ]
        )
        out = capsys.readouterr().out
        assert code == 0, out
        saved = json.loads((edge_dir / calibrate.CALIBRATION_FILE).read_text())
        assert saved["target"] == "agreement" and saved["questions"] == 10
        assert saved["chosen"]["agreement"] >= 0.9 and f"tau = {saved['tau']:.4f}" in out
        assert (
            edge_main(
                [
                    "ask",
                    "--model",
                    str(edge_dir),
                    "--image",
                    str(image),
                    "--prompt",
                    "What colour?",
                    "--json",
                    "--cpu",
                ]
            )
            == 0
        )
        assert json.loads(capsys.readouterr().out)["tau"] == saved["tau"]
        # what S was computed with is recorded; asking with other settings warns, --tau does not
        tiles = EdgeModel.load(edge_dir, providers=[CPU]).files.tiling.max_tiles
        assert (saved["max_new_tokens"], saved["max_tiles"]) == (6, tiles)
        assert saved["consistency_retention"] == DEFAULT_CONSISTENCY_RETENTION
        ask = ["ask", "--model", str(edge_dir), "--image", str(image), "--prompt", "What colour?", "--cpu"]
        assert edge_main([*ask, "--max-new-tokens", "6", "--max-tiles", "1"]) == 0
        warning = capsys.readouterr().err
        assert f"--max-tiles: calibrated {tiles}, now 1" in warning and "--max-new-tokens" not in warning
        assert edge_main([*ask, "--max-new-tokens", "6", "--max-tiles", "1", "--tau", "0.5"]) == 0
        assert "warning" not in capsys.readouterr().err


def test_older_calibration_files_read_without_the_s_settings(tmp_path):
    """A file written before the settings were recorded still reads, and compares as unknown."""
    row = calibrate.SweepRow(tau=0.5, exit_rate=0.4, cloud_load=0.6, agreement=1.0, accuracy=None,
                             edge_accuracy_on_exits=None)  # fmt: skip
    older = {"tau": 0.5, "target": "exit_rate", "target_value": 0.4, "questions": 10, "retention": 0.09,
             "chosen": vars(row), "sweep": [vars(row)]}  # fmt: skip
    (tmp_path / calibrate.CALIBRATION_FILE).write_text(json.dumps(older))
    loaded = calibrate.read_calibration(tmp_path)
    assert loaded.tau == 0.5 and loaded.max_tiles is None and loaded.consistency_retention is None
    now = {"consistency_retention": 0.35, "max_new_tokens": 8, "max_tiles": 2}
    assert calibrate.differences(loaded, now) == []
    recorded = dataclasses.replace(loaded, consistency_retention=0.35, max_new_tokens=32, max_tiles=2)
    assert calibrate.differences(recorded, now) == ["--max-new-tokens: calibrated 32, now 8"]


def test_a_corrupt_calibration_file_stops_ask_with_its_name_and_calibrate_replaces_it(pair, tmp_path, capsys):
    """``ask`` without --tau exits 2 naming the file; with --tau it runs; ``calibrate`` overwrites it."""
    edge_dir = tmp_path / "edge"
    shutil.copytree(pair[0], edge_dir)
    bad = edge_dir / calibrate.CALIBRATION_FILE
    bad.write_text('{"tau": 0.5, "sweep": [')  # cut short
    image = tmp_path / "q.png"
    image.write_bytes(load_questions("synthetic:test", 1)[0].image)
    ask = ["ask", "--model", str(edge_dir), "--image", str(image), "--prompt", "What colour?", "--cpu"]
    with pytest.raises(SystemExit) as stopped:
        edge_main(ask)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert calibrate.CALIBRATION_FILE in err and "--tau" in err
    assert (
        edge_main([*ask, "--tau", "0", "--max-new-tokens", "4"]) == 0
    )  # tau 0: always exits, no cloud needed
    capsys.readouterr()
    cal = ["calibrate", "--model", str(edge_dir), "--questions", "synthetic:val", "-n", "4", "--cpu"]
    assert edge_main([*cal, "--target-exit-rate", "0.5", "--max-new-tokens", "4"]) == 0
    assert calibrate.read_calibration(edge_dir).questions == 4
