"""`python -m proxy` runs the same CLI as the `squirro-proxy` script."""

from .cli import run

run()
