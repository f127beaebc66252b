"""`python -m chatvec.cli`: the same as the `chatvec` command."""

from chatvec.cli.main import entry

if __name__ == "__main__":
    entry()
