"""DVC in a real git + DVC repo with a local remote under tmp_path: md5, add, push, pull, regeneration."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from secvec.config import DataConfig
from secvec.data import DataError
from secvec.data.build import build_dataset
from secvec.data.versioning import (
    dataset_md5,
    ensure_dvc_repo,
    pull_or_regenerate,
    track_and_push,
    tracked_md5,
    version_data,
)

MICRO = DataConfig(preset="micro")


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("SECVEC_DVC_REMOTE", raising=False)
    root = tmp_path / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    ensure_dvc_repo(root)
    return root


def _git_staged(root: Path) -> str:
    command = ["git", "diff", "--cached", "--name-only"]
    return subprocess.run(command, cwd=root, capture_output=True, text=True, check=True).stdout


def test_init_writes_a_portable_config_and_stages_nothing(repo):
    config = (repo / ".dvc" / "config").read_text()
    assert "url = ../.dvc-remote" in config and "analytics = False" in config and "no_scm" not in config
    assert str(repo) not in config
    assert (repo / ".dvcignore").is_file() and (repo / ".dvc-remote").is_dir()
    assert _git_staged(repo) == ""
    assert ensure_dvc_repo(repo) == repo / ".dvc-remote"  # idempotent
    assert (repo / ".dvc" / "config").read_text() == config


def test_dataset_md5_equals_dvc_add_on_awkward_files(repo):
    data = repo / "data"
    (data / "sub").mkdir(parents=True)
    (data / "crlf.txt").write_bytes(b"a\r\nb\r\n")  # DVC 3 hashes raw bytes (no dos2unix)
    (data / "sub" / "ünï cödé.jsonl").write_text('{"x": "é"}\n', encoding="utf-8")
    (data / "B.bin").write_bytes(bytes(range(256)))
    (data / "a.txt").write_text("")
    md5 = track_and_push(repo, data)
    assert md5 == dataset_md5(data) == tracked_md5(repo / "data.dvc") and md5.endswith(".dir")
    assert (repo / ".dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]).is_file()
    assert _git_staged(repo) == ""


def test_pull_then_regenerate_a_missing_dataset(repo):
    build_dataset(MICRO, repo / "data")
    md5 = track_and_push(repo, repo / "data")
    files = {p.name: p.read_bytes() for p in (repo / "data").iterdir()}

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    assert pull_or_regenerate(repo, MICRO) == md5  # from the remote
    assert {p.name: p.read_bytes() for p in (repo / "data").iterdir()} == files

    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / ".dvc-remote")
    assert pull_or_regenerate(repo, MICRO) == md5  # no copy anywhere: rebuilt from the config

    shutil.rmtree(repo / "data")
    with pytest.raises(DataError, match=r"data.dvc: field 'outs\[0\].md5': the regenerated data hashes to"):
        pull_or_regenerate(repo, MICRO.model_copy(update={"seed": 1}))



def test_version_data_tracks_the_projects_data_and_only_hashes_other_folders(repo):
    build_dataset(MICRO, repo / "elsewhere")
    assert version_data(repo, repo / "elsewhere") == dataset_md5(repo / "elsewhere")
    assert not (repo / "elsewhere.dvc").exists()
    build_dataset(MICRO, repo / "data")
    md5 = version_data(repo, repo / "data" / ".." / "data")
    assert md5 == tracked_md5(repo / "data.dvc") == dataset_md5(repo / "data")
    assert (repo / ".dvc-remote" / "files" / "md5" / md5[:2] / md5[2:]).is_file()

def test_remote_override_stays_out_of_the_committed_config(repo, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("SECVEC_DVC_REMOTE", str(elsewhere))
    assert ensure_dvc_repo(repo) == elsewhere
    assert str(elsewhere) in (repo / ".dvc" / "config.local").read_text()
    assert str(elsewhere) not in (repo / ".dvc" / "config").read_text()
    build_dataset(MICRO, repo / "data")
    md5 = track_and_push(repo, repo / "data")
    assert (elsewhere / "files" / "md5" / md5[:2] / md5[2:]).is_file()
    monkeypatch.delenv("SECVEC_DVC_REMOTE")
    ensure_dvc_repo(repo)
    assert str(elsewhere) not in (repo / ".dvc" / "config.local").read_text()
