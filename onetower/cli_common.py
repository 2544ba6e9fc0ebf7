"""What every CLI module shares: the rich console and the one-line error exit."""

from __future__ import annotations

import typer
from rich.console import Console

console = Console()


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one clear error line and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)
