"""`python -m compresspipe.sensitivity.worker SPEC.json`: one process of `compresspipe sensitivity --workers N`."""

from __future__ import annotations

import sys

from compresspipe.sensitivity.command import worker_main

if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
