"""anchor_lib.provenance: the hardware, versions and commit recorded beside every result."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from anchor_lib import provenance

GIT = shutil.which("git")
needs_git = pytest.mark.skipif(GIT is None, reason="git is not installed")


def _git(repo, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A one-commit repository that provenance reads instead of this one."""
    _git(tmp_path, "init", "-q")
    (tmp_path / "tracked.txt").write_text("a\n")
    _git(tmp_path, "add", "tracked.txt")
    _git(tmp_path, "commit", "-q", "-m", "one")
    monkeypatch.setattr(provenance, "_REPO", tmp_path)
    monkeypatch.delenv("ANCHOR_COMMIT", raising=False)
    return tmp_path


@needs_git
def test_commit_is_head_and_says_dirty_only_for_changed_tracked_files(repo):
    head = _git(repo, "rev-parse", "HEAD")
    assert len(head) == 40
    assert provenance.git_commit() == head
    (repo / "untracked.txt").write_text("new\n")  # results written beside the code are untracked
    assert provenance.git_commit() == head
    (repo / "tracked.txt").write_text("b\n")
    assert provenance.git_commit() == head + "-dirty"


@needs_git
def test_the_variable_comes_before_git_and_an_empty_one_is_ignored(repo, monkeypatch):
    # A tree shipped to a GPU machine may carry a stale .git: the shipper's word wins.
    monkeypatch.setenv("ANCHOR_COMMIT", "abc123")
    assert provenance.git_commit() == "abc123"
    monkeypatch.setenv("ANCHOR_COMMIT", "")
    assert provenance.git_commit() == _git(repo, "rev-parse", "HEAD")


def test_commit_is_unknown_outside_a_repository_or_without_git(tmp_path, monkeypatch):
    monkeypatch.delenv("ANCHOR_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # no repository above
    monkeypatch.setattr(provenance, "_REPO", tmp_path)
    assert provenance.git_commit() == "unknown"
    monkeypatch.setattr(provenance, "_REPO", tmp_path / "missing")  # cwd that does not exist
    assert provenance.git_commit() == "unknown"
    monkeypatch.setenv("PATH", str(tmp_path))  # no git program at all
    assert provenance.git_commit() == "unknown"


def test_cpu_hardware_names_the_processor_and_core_count():
    name = provenance.hardware("cpu")
    assert name.startswith("CPU (") and name.endswith(f", {os.cpu_count()} cores)")
    assert provenance.hardware(torch.device("cpu")) == name
    if not torch.cuda.is_available():  # the default is the device training would use
        assert provenance.hardware() == name


def test_cpu_hardware_prefers_the_processors_name_to_the_architecture(monkeypatch):
    monkeypatch.setattr(provenance.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(provenance.platform, "processor", lambda: "Intel Xeon")
    assert provenance.hardware("cpu").startswith("CPU (Intel Xeon, ")
    monkeypatch.setattr(provenance.platform, "processor", lambda: "")  # Linux often says nothing
    assert provenance.hardware("cpu").startswith("CPU (x86_64, ")


def test_describe_records_hardware_torch_and_commit(monkeypatch):
    monkeypatch.setenv("ANCHOR_COMMIT", "f00d")
    assert provenance.describe("cpu") == {"hardware": provenance.hardware("cpu"),
                                          "torch": torch.__version__, "commit": "f00d"}
