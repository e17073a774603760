"""Locating files that ship with the repository (tests/assets/...) from any working directory."""

from pathlib import Path

# torchtitan/components/datasets/paths.py -> repository root (the package is installed with `pip install -e`).
REPO_ROOT = Path(__file__).resolve().parents[3]


def resolve_path(path: str | Path) -> Path | None:
    """`path` as given if it exists, else relative to the repository root if it exists there, else None.

    Lets the defaults (`./tests/assets/...`) work when a job is launched from another directory.
    """
    given = Path(path).expanduser()
    if given.exists():
        return given
    if not given.is_absolute() and (REPO_ROOT / given).exists():
        return REPO_ROOT / given
    return None
