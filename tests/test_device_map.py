"""``--device-map``: a large model placed by accelerate answers as the engine on one device does.

Guards against a load path that moves an accelerate-placed model with
``.to()`` or feeds inputs to a device other than the first layer's, and
against a flag that crashes deep inside transformers when accelerate is
missing instead of refusing on the command line.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from conftest import make_test_image  # noqa: E402
from servers import cloud_request, tiling_of  # noqa: E402

from stitchvlm.cloud import cli  # noqa: E402
from stitchvlm.cloud.engine import CloudEngine, EngineConfig, device_map_available  # noqa: E402

requires_accelerate = pytest.mark.skipif(not device_map_available(), reason="needs accelerate")
MAX_NEW_TOKENS = 8


def greedy_tokens(config: EngineConfig) -> tuple[tuple[int, ...], torch.device]:
    """The engine's greedy answer to one fixed request, and the device its inputs went to."""
    request = cloud_request(
        tiling_of(config.model_dir), make_test_image(96, 80, seed=5), max_new_tokens=MAX_NEW_TOKENS
    )
    engine = CloudEngine.load(config)
    try:
        return engine.answer(request).token_ids, engine.sgp.device
    finally:
        engine.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@requires_accelerate
def test_device_map_auto_on_gpus_matches_the_cpu_engine(tiny_large_checkpoint):
    """fp32, TF32 off: the accelerate-placed model gives the CPU engine's greedy tokens, token for token."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # the vision tower's patch convolution
    expected, _ = greedy_tokens(EngineConfig(model_dir=tiny_large_checkpoint))
    placed, device = greedy_tokens(EngineConfig(model_dir=tiny_large_checkpoint, device_map="auto"))
    assert device.type == "cuda"
    assert placed == expected


@requires_accelerate
def test_device_map_auto_loads_and_matches_where_it_runs(tiny_checkpoint):
    """On a machine without GPUs "auto" places everything on the CPU: the same tokens as ``device="cpu"``."""
    if torch.cuda.is_available():
        pytest.skip("covered by the GPU test")
    expected, _ = greedy_tokens(EngineConfig(model_dir=tiny_checkpoint))
    placed, device = greedy_tokens(EngineConfig(model_dir=tiny_checkpoint, device_map="auto"))
    assert device.type == "cpu"
    assert placed == expected


def parse(*argv: str):
    parser = cli.build_parser()
    args = parser.parse_args(["serve", *argv])
    return cli.configs_from_args(parser, args)


def test_cli_refuses_device_map_without_accelerate(tiny_checkpoint, monkeypatch, capsys):
    """No accelerate: exit 2 with a message naming it, before anything loads."""
    monkeypatch.setattr(cli, "device_map_available", lambda: False)
    with pytest.raises(SystemExit) as exited:
        parse("--model", str(tiny_checkpoint), "--device-map", "auto")
    assert exited.value.code == 2
    assert "--device-map needs accelerate" in capsys.readouterr().err


def test_cli_device_map_reaches_the_engine_config(tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(cli, "device_map_available", lambda: True)
    _, engine = parse("--model", str(tiny_checkpoint), "--device-map", "auto")
    assert engine.device_map == "auto"
    _, engine = parse("--model", str(tiny_checkpoint))
    assert engine.device_map is None
    with pytest.raises(SystemExit):
        parse("--model", str(tiny_checkpoint), "--device-map", "auto", "--device", "cuda:0")
    assert "drop --device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse("--model", str(tiny_checkpoint), "--device-map", "everywhere")  # argparse's choices


def test_engine_config_refuses_an_unknown_device_map(tmp_path):
    with pytest.raises(ValueError, match="device_map"):
        EngineConfig(model_dir=tmp_path, device_map="cuda:0")
