"""One-off investigations, run as ``python -m tools.scripts.<name>`` (README.md lists them)."""
