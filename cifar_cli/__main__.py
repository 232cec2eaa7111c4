"""`python -m cifar_cli` (what torchrun launches) runs the same app as the `cifar` command."""

from cifar_cli.cli import main

if __name__ == "__main__":  # not when a spawned worker process imports this module
    main()
