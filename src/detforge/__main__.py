"""`python -m detforge` (also what `torchrun -m detforge` runs)."""

from detforge.cli.main import main

main()
