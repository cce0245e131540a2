"""`python -m mlxtune` is the `mlxtune` command."""

from .cli import main

if __name__ == "__main__":
    main()
