"""The ``hogwild`` console script: ``cluster.cli`` plus the commands of this layer (``serve``)."""

from __future__ import annotations

import sys

from cluster.cli import Command, main as cluster_main

COMMANDS: dict[str, Command] = {}


def main(argv: list[str] | None = None) -> int:
    return cluster_main(argv, COMMANDS)


if __name__ == "__main__":
    sys.exit(main())
