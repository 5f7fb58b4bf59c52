"""`python -m loop.main …`: the entry point for `ray job submit --working-dir . -- python -m
loop.main run configs/X.yaml [overrides]`. Same commands as the `prefloop` CLI."""

from loop.cli import main

if __name__ == "__main__":
    main()
