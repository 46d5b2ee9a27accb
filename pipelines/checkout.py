"""This checkout, as git knows it: what commit runs here, and whether it has uncommitted changes."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def git(*args: str, cwd: Path = REPO, timeout: float = 30) -> tuple[int, str]:
    """``git ARGS``: its exit status and its output (its error output when it failed)."""
    try:
        run = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 1, f"git {args[0]} did not answer within {timeout:g} s"
    except OSError as error:
        return 1, f"git could not run ({error.strerror})"
    return run.returncode, (run.stdout if run.returncode == 0 else run.stderr).strip()


def head() -> str | None:
    """The commit checked out, None outside a git checkout."""
    code, commit = git("rev-parse", "HEAD")
    return commit if code == 0 else None


def has_uncommitted_changes() -> bool:
    return bool(git("status", "--porcelain", "--untracked-files=no")[1])


def described() -> str:
    """The commit checked out, for a report: marked when it has uncommitted changes."""
    commit = head()
    if commit is None:
        return "unknown (not a git checkout)"
    return commit[:12] + (" with uncommitted changes" if has_uncommitted_changes() else "")
