"""``python -m gatefill`` runs the CLI."""

from gatefill.cli import entrypoint

entrypoint()
