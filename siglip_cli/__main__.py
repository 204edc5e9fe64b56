"""The `siglip` command: `python -m siglip_cli ...`, and the console script's entry point."""

import sys


def main() -> None:
    """Run the CLI; Ctrl-C while torch is still being imported ends quietly too (the commands handle it later)."""
    try:
        from .cli import app

        app(prog_name="siglip")
    except KeyboardInterrupt:
        print("interrupted.", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
