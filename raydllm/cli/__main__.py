"""CLI layer: `python -m raydllm.cli ...` runs the `raydllm` command."""
import sys

from raydllm.cli.app import main

sys.exit(main())
