"""What every result file records (where, when, from which code and command) and markdown
tables."""

from __future__ import annotations

import datetime
import os
import pathlib
import shlex
import subprocess
import sys

import jax

REPO = pathlib.Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """The checkout's commit, with "-dirty" when tracked files differ from it; LSERVE_GIT_COMMIT
    when set (a copy of a checkout without its .git, e.g. on a remote GPU machine); "unknown"
    outside a git checkout."""
    if os.environ.get("LSERVE_GIT_COMMIT"):
        return os.environ["LSERVE_GIT_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def command_line() -> str:
    """The command that is running, as a shell would take it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("/lserve", "/cli.py")):
        argv[0] = "lserve"
    elif argv and argv[0].endswith(".py"):
        argv.insert(0, "python")
    return shlex.join(argv)


def provenance() -> dict:
    """Where, when and how a result was produced: device, platform, jax version, UTC date, git
    commit and the command line."""
    dev = jax.devices()[0]
    return {"device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
            "jax_version": jax.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
            "git_commit": git_commit(), "command": command_line()}


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)
