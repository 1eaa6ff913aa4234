"""`python -m app --model MODEL [flags]`: the `vlserve serve` flags, without the subcommand."""

import sys

from app.cli import module_main

sys.exit(module_main())
