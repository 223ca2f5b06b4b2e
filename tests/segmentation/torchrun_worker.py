"""Run several ``medflow`` commands in one torchrun launch (each rank runs them in order),
so that a test pays torchrun's start-up once: ``torchrun ... torchrun_worker.py CMDS.json``
where CMDS.json holds a list of argument lists for :func:`medflow.cli.main`."""

import json
import sys
from pathlib import Path

from medflow.cli import main

if __name__ == "__main__":
    for argv in json.loads(Path(sys.argv[1]).read_text()):
        code = main(argv)
        if code:
            sys.exit(code)
