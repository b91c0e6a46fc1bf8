"""Output paths are checked before any work; images are written atomically in the format the suffix asks for."""

import os
import stat

import pytest
from PIL import Image

from sdrt.cli import main
from sdrt.errors import InputError
from sdrt.outputs import output_paths, read_parameters, save_image

PARAMS = {"prompt": "a red 7", "steps": 2, "guidance_scale": 7.5, "seed": 3, "width": 64, "height": 64, "scheduler": "pndm"}


def test_paths_resolve(tmp_path):
    assert output_paths(str(tmp_path / "x"), 1) == [tmp_path / "x.png"]
    assert output_paths(str(tmp_path / "x.JPG"), 1) == [tmp_path / "x.JPG"]
    assert [p.name for p in output_paths(str(tmp_path / "a.webp"), 2)] == ["a-1.webp", "a-2.webp"]
    (tmp_path / "00007-sdrt.png").write_bytes(b"")
    assert [p.name for p in output_paths(str(tmp_path), 2)] == ["00008-sdrt.png", "00009-sdrt.png"]  # a folder: numbered
    assert output_paths(str(tmp_path / "new") + "/", 1) == [tmp_path / "new" / "00001-sdrt.png"]
    assert not (tmp_path / "new").exists()  # nothing created before the images exist


@pytest.mark.parametrize("output,match", [
    ("", "is empty"),
    ("x.gif", "suffix '.gif'"),
    ("/proc/x.png", "cannot write in /proc"),
    ("FILE/x.png", "is a file, not a folder"),
])
def test_bad_paths_refused(tmp_path, output, match):
    (tmp_path / "FILE").write_bytes(b"x")
    with pytest.raises(InputError, match=match):
        output_paths(output.replace("FILE", str(tmp_path / "FILE")), 1)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_formats_carry_parameters(tmp_path, suffix):
    path = save_image(Image.new("RGB", (32, 32), "red"), tmp_path / f"x{suffix}", PARAMS)
    with Image.open(path) as im:
        assert im.format == {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[suffix]
    assert read_parameters(path).startswith("a red 7\nSteps: 2")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~_umask()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(self, fp, *a, **k):
        fp.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(OSError):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "x.png", PARAMS)
    assert list(tmp_path.iterdir()) == []


def test_cli_checks_output_before_work(tmp_path, capsys, monkeypatch):
    import sdrt.pipeline

    monkeypatch.setattr(sdrt.pipeline.Pipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "FILE").write_bytes(b"x")
    for output in ("", str(tmp_path / "FILE" / "x.png"), str(tmp_path / "x.bmp2")):
        assert main(["generate", "a 7", "-o", output]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_cli_writes_into_folder_and_jpeg(tmp_path, capsys):
    assert main(["generate", "a red 7", "--steps", "1", "-q", "-s", "5", "--num-images", "2", "-o", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seed 6: image 2 of the batch from seed 5" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00001-sdrt.png", "00002-sdrt.png"]
    assert main(["generate", "a red 7", "--steps", "1", "-q", "-o", str(tmp_path / "x.jpg")]) == 0
    assert (tmp_path / "x.jpg").exists() and not (tmp_path / "x.jpg.png").exists()
    assert "Steps: 1" in read_parameters(tmp_path / "x.jpg")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
