"""`python -m ps.cli` is `psctl` (used by `psctl run` to start its children)."""
from ps.cli import main

main()
