"""`python -m slimtune ...` (and `torchrun -m slimtune run RECIPE`): the `slimtune` command."""

from slimtune.cli import main

main()
