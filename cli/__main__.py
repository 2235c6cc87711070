"""`python -m cli ...` is `gs ...`."""

from cli.app import main

main()
