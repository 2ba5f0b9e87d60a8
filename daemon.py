"""Entry point: ``python daemon.py [--socket PATH] [--state-dir DIR] ...`` (see ``--help``)."""

from daemon.app import main

if __name__ == "__main__":
    raise SystemExit(main())
