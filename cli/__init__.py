"""Thin Typer front-ends: each command parses options, calls one library function, renders."""
