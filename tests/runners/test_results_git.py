"""Provenance of results: the git block for a checkout (clean, dirty) and for a copy without .git (manifest)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from runners.results import COMMIT_ENV, TREE_MANIFEST, git_blob_sha1, git_state


def git(repo: Path, *args: str) -> bytes:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", *args],
                          cwd=repo, check=True, capture_output=True).stdout


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "pkg").mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    (root / "pkg" / "b.py").write_text("x = 1\n")
    (root / "weights.bin").write_bytes(bytes(range(256)) * 4)
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "init")
    return root


def test_clean_checkout_records_dirty_false(repo: Path, monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    (repo / "untracked.txt").write_text("not part of the tree\n")
    state = git_state(repo)
    assert state["commit"] == git(repo, "rev-parse", "HEAD").decode().strip()
    assert state["dirty"] is False and state["changed_paths"] == [] and state["diff_sha256"] is None
    assert state["source"] == "git"


def test_dirty_checkout_records_changed_paths_and_the_diff_hash(repo: Path):
    (repo / "a.txt").write_text("alpha, edited\n")
    (repo / "pkg" / "b.py").unlink()
    state = git_state(repo)
    assert state["dirty"] is True and state["changed_paths"] == ["a.txt", "pkg/b.py"]
    diff = git(repo, "diff", "HEAD", "--binary")
    assert state["diff_sha256"] == hashlib.sha256(diff).hexdigest()
    # a different edit gives a different hash; staging it changes nothing (diff against HEAD)
    (repo / "a.txt").write_text("alpha, edited again\n")
    other = git_state(repo)
    assert other["diff_sha256"] != state["diff_sha256"]
    git(repo, "add", "a.txt")
    assert git_state(repo)["diff_sha256"] == other["diff_sha256"]


def test_blob_hash_is_gits(repo: Path):
    for name in ("a.txt", "pkg/b.py", "weights.bin"):
        expected = git(repo, "hash-object", name).decode().strip()
        assert git_blob_sha1((repo / name).read_bytes()) == expected


def copy_without_git(repo: Path, dest: Path) -> Path:
    (repo / TREE_MANIFEST).write_bytes(git(repo, "ls-files", "-s"))
    shutil.copytree(repo, dest, ignore=shutil.ignore_patterns(".git"))
    return dest


def test_copy_without_git_verified_against_the_manifest(repo: Path, tmp_path: Path, monkeypatch):
    commit = git(repo, "rev-parse", "HEAD").decode().strip()
    copy = copy_without_git(repo, tmp_path / "copy")
    monkeypatch.setenv(COMMIT_ENV, commit)
    state = git_state(copy)
    assert (state["source"], state["commit"], state["commit_from"]) == ("manifest", commit, COMMIT_ENV)
    assert state["dirty"] is False and state["changed_paths"] == [] and state["files_checked"] == 3
    assert state["manifest_sha256"] == hashlib.sha256((copy / TREE_MANIFEST).read_bytes()).hexdigest()

    (copy / "pkg" / "b.py").write_text("x = 2\n")
    (copy / "a.txt").unlink()
    dirty = git_state(copy)
    assert dirty["dirty"] is True and dirty["changed_paths"] == ["a.txt", "pkg/b.py"]
    assert dirty["diff_sha256"] and dirty["commit"] == commit
    (copy / "pkg" / "b.py").write_text("x = 3\n")
    assert git_state(copy)["diff_sha256"] != dirty["diff_sha256"]


def test_copy_without_git_or_manifest_is_unverified(tmp_path: Path, monkeypatch):
    (tmp_path / "a.txt").write_text("alpha\n")
    monkeypatch.setenv(COMMIT_ENV, "0" * 40)
    state = git_state(tmp_path)
    assert state["commit"] == "0" * 40 and state["dirty"] is None and "cannot be checked" in state["note"]
    monkeypatch.delenv(COMMIT_ENV)
    assert git_state(tmp_path)["commit"] is None


def test_manifest_with_quoted_paths_and_symlinks(repo: Path, tmp_path: Path):
    (repo / "café \"x\".txt").write_text("quoted by git ls-files\n")
    (repo / "link").symlink_to("a.txt")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "more")
    assert b'"caf\\303\\251 \\"x\\".txt"' in git(repo, "ls-files", "-s")  # git quotes this path
    copy = shutil.copytree(repo, tmp_path / "copy2", symlinks=True, ignore=shutil.ignore_patterns(".git"))
    (copy / TREE_MANIFEST).write_bytes(git(repo, "ls-files", "-s"))
    state = git_state(copy)
    assert state["dirty"] is False and state["files_checked"] == 5
    (copy / "café \"x\".txt").write_text("edited\n")
    assert git_state(copy)["changed_paths"] == ['café "x".txt']
