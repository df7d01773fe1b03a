"""`python -m prunekit.cli ...`, as `prunekit ...`."""

from prunekit.cli import main

main()
