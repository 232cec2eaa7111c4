"""`python -m cifar_cli` (what torchrun launches) runs the same app as the `cifar` command."""

from cifar_cli.cli import main

main()
