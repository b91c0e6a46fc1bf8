"""SDXL's micro-conditioning on the command line: `sdrt generate` takes sdrt-host's flags (cpp/tools/sdrt_host.cpp).
The C++ host's images with these arguments equal the Python runtime's: cpp/tests/fixtures.py MICRO_CASES (ctest)."""

import pytest


def test_cli_micro_conditioning_flags_map_to_the_pipeline_arguments(capsys):
    """`sdrt generate` takes sdrt-host's micro-conditioning flags (WIDTHxHEIGHT sizes, TOP,LEFT corners) and passes
    them as diffusers' (height, width) pairs."""
    from sdrt.cli import build_parser
    from sdrt.cli.generate import micro_arguments

    args = build_parser().parse_args(["generate", "a cat", "--original-size", "1024x768", "--crop-top-left", "16,8",
                                      "--negative-target-size", "512x256", "--aesthetic-score", "7"])
    assert micro_arguments(args) == {"original_size": (768, 1024), "crops_coords_top_left": (16, 8),
                                     "negative_target_size": (256, 512), "aesthetic_score": 7.0}
    assert micro_arguments(build_parser().parse_args(["generate", "a cat"])) == {}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "a cat", "--original-size", "1024"])
    assert "is not WIDTHxHEIGHT" in capsys.readouterr().err
