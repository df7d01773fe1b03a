"""`python -m prunekit ...` (and `torchrun ... -m prunekit prune ...`): the command line."""

from prunekit.cli import main

main()
