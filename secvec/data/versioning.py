"""Data versions with DVC: `data/` tracked by `data.dvc` and pushed to a local remote.

The dataset md5 (DVC's `.dir` hash of the folder) is the data's lineage id: `dataset_md5` computes it
without DVC, so caches and tests can compare a folder with the version recorded in `data.dvc`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import yaml

from secvec.config import DataConfig
from secvec.data.build import build_dataset
from secvec.data.schema import DataError

log = logging.getLogger(__name__)

REMOTE_ENV = "SECVEC_DVC_REMOTE"
REMOTE_NAME = "local"
DEFAULT_REMOTE = ".dvc-remote"


def _open_repo(root: Path):
    os.environ["DVC_NO_ANALYTICS"] = "1"
    from dvc.repo import Repo  # slow import (~1 s): only when DVC is used

    repo = Repo(str(root))
    # DVC ends every `add` with "To track the changes with git, run: git add ..." and "To enable auto
    # staging, run: dvc config core.autostage true", even when nothing changed. Staging stays the
    # developer's (no autostage, see ensure_dvc_repo); `track_and_push` logs when data.dvc really changed.
    repo.scm_context.quiet = True
    return repo


def _is_git_repo(root: Path) -> bool:
    return any((p / ".git").exists() for p in (root, *root.parents))


def ensure_dvc_repo(root: str | Path, remote: str | Path | None = None) -> Path:
    """Initialise DVC in `root` if needed and point the default remote at a local folder.

    The default remote `<root>/.dvc-remote` is stored relative to `.dvc/` in `.dvc/config` (committed);
    a remote given here or by `$SECVEC_DVC_REMOTE` goes to `.dvc/config.local` (this machine only).

    Returns:
        The remote folder (absolute).
    """
    root = Path(root).resolve()
    os.environ["DVC_NO_ANALYTICS"] = "1"
    if not (root / ".dvc").is_dir():
        from dvc.repo import Repo

        # A plain init stages its files in git (`git add`); initialising without SCM and then re-enabling
        # git writes the same files and leaves staging and committing to the developer.
        Repo.init(str(root), no_scm=True).close()
    override = remote or os.environ.get(REMOTE_ENV)
    path = Path(override).expanduser().resolve() if override else root / DEFAULT_REMOTE
    with _open_repo(root) as repo:
        with repo.config.edit("repo") as conf:
            if _is_git_repo(root):
                conf["core"].pop("no_scm", None)
            conf["core"]["analytics"] = False
            conf["core"]["remote"] = REMOTE_NAME
            # DVC reads a relative url against the working directory and stores it relative to .dvc/.
            conf["remote"][REMOTE_NAME] = {"url": os.path.relpath(root / DEFAULT_REMOTE)}
        if override or (root / ".dvc" / "config.local").exists():
            with repo.config.edit("local") as conf:
                if override:
                    conf["remote"][REMOTE_NAME] = {"url": str(path)}
                else:  # an override that is no longer set
                    conf["remote"].pop(REMOTE_NAME, None)
    path.mkdir(parents=True, exist_ok=True)
    return path


def tracked_md5(dvc_file: str | Path) -> str | None:
    """The md5 recorded in a `.dvc` file (e.g. `data.dvc`), or None when the file does not exist."""
    path = Path(dvc_file)
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))["outs"][0]["md5"]
    except (yaml.YAMLError, KeyError, IndexError, TypeError) as err:
        raise DataError.at(path, None, "outs[0].md5", f"not a DVC output file ({err})") from None


def track_and_push(root: str | Path, data_dir: str | Path) -> str:
    """`dvc add` the folder (writing `<name>.dvc` beside it) and `dvc push` it to the default remote.

    Returns:
        The folder's md5 as recorded in the `.dvc` file (ends with `.dir`).
    """
    data = Path(data_dir).resolve()
    dvc_file = data.with_name(f"{data.name}.dvc")
    before = tracked_md5(dvc_file)
    with _open_repo(Path(root).resolve()) as repo:
        repo.add([str(data)])
        repo.push(targets=[str(dvc_file)])
    md5 = tracked_md5(dvc_file)
    assert md5 == dataset_md5(data), "dataset_md5 disagrees with DVC"  # our cache keys rely on it
    if md5 != before:
        log.info("%s now records %s: commit it with git to keep this data version", dvc_file, md5)
    return md5


def _file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def dataset_md5(data_dir: str | Path) -> str:
    """DVC's md5 of a folder, computed without DVC.

    DVC 3 hashes each file's raw bytes, lists `{"md5", "relpath"}` sorted by POSIX relpath and hashes
    `json.dumps(list, sort_keys=True)` (Python's default separators and ASCII escapes), adding `.dir`.
    """
    root = Path(data_dir)
    entries = [{"md5": _file_md5(p), "relpath": p.relative_to(root).as_posix()}
               for p in root.rglob("*") if p.is_file()]
    entries.sort(key=lambda e: e["relpath"])
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode("utf-8")).hexdigest() + ".dir"


def version_data(root: str | Path, data_dir: str | Path) -> str:
    """Version a freshly built folder: the project's `data/` is `dvc add`ed and pushed (DVC initialised if
    needed); any other folder is only hashed.

    Returns:
        The folder's md5 (DVC's, ends with `.dir`).
    """
    root, data = Path(root), Path(data_dir)
    if data.resolve() == (root / "data").resolve():
        ensure_dvc_repo(root)
        return track_and_push(root, data)
    return dataset_md5(data)


def pull_or_regenerate(root: str | Path, config: DataConfig, data_dir: str | Path | None = None) -> str:
    """Make `data_dir` hold the version recorded in its `.dvc` file: as is, by `dvc pull`, or rebuilt.

    A fresh clone has `data.dvc` but no data and maybe no remote copy; the data is then regenerated from
    `config` (deterministic) and must hash to the recorded md5. Without a `.dvc` file it is just built.

    Returns:
        The md5 of the data now in `data_dir`.

    Raises:
        DataError: the regenerated data differs from the recorded version.
    """
    root = Path(root).resolve()
    data = Path(data_dir).resolve() if data_dir else root / "data"
    dvc_file = data.with_name(f"{data.name}.dvc")
    expected = tracked_md5(dvc_file)
    if expected and data.is_dir() and dataset_md5(data) == expected:
        return expected
    if expected:
        from dvc.exceptions import DvcException

        try:
            with _open_repo(root) as repo:
                repo.pull(targets=[str(dvc_file)], force=True)
            if dataset_md5(data) == expected:
                return expected
        except DvcException as err:
            log.warning("dvc pull of %s failed (%s); regenerating the data", dvc_file.name, err)
    build_dataset(config, data, root)
    md5 = dataset_md5(data)
    if expected and md5 != expected:
        raise DataError.at(dvc_file, None, "outs[0].md5", f"the regenerated data hashes to {md5}, not the "
                           f"recorded {expected}: the config or the generator changed")
    return md5
