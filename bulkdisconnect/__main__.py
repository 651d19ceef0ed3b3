"""`python -m bulkdisconnect`, and the `bulkdisconnect` command."""

from __future__ import annotations


def main() -> None:
    """Remember stop signals first (see early.py), then parse and run the command."""
    from bulkdisconnect.early import remember_stop_signals

    remember_stop_signals()
    from bulkdisconnect.cli import main as command

    command()


if __name__ == "__main__":
    main()
