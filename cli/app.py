"""`gs`: the command line. The app and what its commands share are in cli/base.py; the commands in cli/submit.py
(jobs submitted), cli/browse.py (jobs and files read) and cli/keys.py."""

from __future__ import annotations

from cli.base import app

# Each registers its commands on the app, in the order `gs --help` lists them.
# isort: off
from cli import submit, browse, keys  # noqa: F401
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    app(prog_name="gs")


if __name__ == "__main__":
    main()
