"""scripts/colab_check.py's own checks, without a Colab-like environment (that takes gigabytes):
which chapters it runs, what it refuses, and how it reads a set-up cell's output."""

from __future__ import annotations

import sys

import by_path
import pytest

colab_check = by_path.load("scripts/colab_check.py")


def test_chapters_are_picked_by_number():
    assert [p.name for p in colab_check.chapters(["3", "08"])] == [
        "03_supervised_contrastive.ipynb", "08_results.ipynb"]
    assert len(colab_check.chapters([])) == 9


def test_an_unknown_chapter_is_refused_with_the_list():
    with pytest.raises(SystemExit, match="unknown chapter in \\['12'\\].*01_adversarial"):
        colab_check.chapters(["12"])


def test_chapters_are_numbers():
    with pytest.raises(SystemExit, match="by number"):
        colab_check.chapters(["03_supervised_contrastive"])


def test_a_folder_that_is_not_an_environment_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="must be a virtual environment"):
        colab_check.main([str(tmp_path), str(tmp_path / "out.json")])


def test_an_environment_without_a_kernel_is_refused(tmp_path, monkeypatch):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "python").symlink_to(sys.executable)
    # this interpreter has torch and ipykernel; hide nbclient from it
    (tmp_path / "sitecustomize.py").write_text("import sys; sys.modules['nbclient'] = None\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(SystemExit, match="lacks what Colab has.*nbclient"):
        colab_check.main([str(tmp_path), str(tmp_path / "out.json")])
    assert not (tmp_path / "out.json").exists()


def test_pips_index_warnings_are_left_out_of_the_setup_output():
    text = ("WARNING: Location 'file:///opt/x/' is ignored: it is neither a file nor a directory.\n"
            "\nNote: you may need to restart the kernel to use updated packages.\nanchor_lib 0.1.0\n")
    assert colab_check.setup_output(text) == ("Note: you may need to restart the kernel to use "
                                              "updated packages.\nanchor_lib 0.1.0")
