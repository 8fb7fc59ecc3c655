"""`python -m prefixvqa`: the same command line as the `prefixvqa` script, for environments where the script's
launcher is not on PATH (a venv that is not activated, a notebook, a job runner that only knows `python`)."""

import sys

from .cli import main

sys.exit(main())
