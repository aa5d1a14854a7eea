"""Where the project lives and what a config may read: the project root, the stage cache, the shared data.

Every other module asks here; nothing else reads these environment variables.
"""

from __future__ import annotations

import os
from pathlib import Path

# The checkout this library belongs to (configs/, data/, .cache/); SECVEC_ROOT moves it (benchmarks, tests).
PROJECT_ROOT = Path(os.environ.get("SECVEC_ROOT", Path(__file__).resolve().parents[1]))
CACHE_ENV = "SECVEC_CACHE"  # the stage cache: `<cache>/<stage>/<key of its inputs>/`
SHARED_ENV = "SECVEC_SHARED_DATASETS"  # the public safety and utility data, read in place
DEFAULT_SHARED = "../shared/datasets"  # beside the project root


def resolve_path(path: str | Path, root: Path | None = None) -> Path:
    """A config path: absolute as given, relative to the project root otherwise."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else (root or PROJECT_ROOT) / path


def cache_root() -> Path:
    """The stage cache: $SECVEC_CACHE, else `.cache/` in the project (read at call time, so tests can move it)."""
    return Path(os.environ.get(CACHE_ENV) or PROJECT_ROOT / ".cache")


def shared_dir(path: str | None = None, root: Path | None = None) -> Path:
    """The shared datasets folder: $SECVEC_SHARED_DATASETS, else `path`, else `../shared/datasets`."""
    return resolve_path(os.environ.get(SHARED_ENV) or path or DEFAULT_SHARED, root).resolve()


def readable_roots(config_file: Path, root: Path | None = None) -> list[Path]:
    """Folders a config may read from without `allow_outside_project`: the project, the shared datasets
    (default place and $SECVEC_SHARED_DATASETS) and the config file's own folder."""
    project = (root or PROJECT_ROOT).resolve()
    roots = [project, resolve_path(DEFAULT_SHARED, project), config_file.resolve().parent]
    return roots + ([resolve_path(os.environ[SHARED_ENV], project)] if os.environ.get(SHARED_ENV) else [])
