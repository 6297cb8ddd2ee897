"""``cheff``: train and sample the Cheff cascade (commands arrive with the cheff issues)."""

from __future__ import annotations

import typer

from cheff import __version__

app = typer.Typer(
    name="cheff",
    no_args_is_help=True,
    add_completion=False,
    help="Cheff: cascaded latent diffusion for chest X-rays (in development).",
)


@app.command()
def version() -> None:
    """Print the cheff version."""
    typer.echo(__version__)


def main() -> None:
    app()
