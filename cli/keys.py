"""`gs keys`: list, create (admin) and revoke API keys."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from cli import render
from cli.base import (
    JsonOption,
    app,
    err,
    out,
    run,
    show_list,
)
from cli.client import ApiClient

keys_app = typer.Typer(help="API keys: list, create (admin) and revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("list")
def keys_list(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Every key (admin) or your own; secrets are never listed."""

    def body(client: ApiClient) -> None:
        show_list(client.keys(), as_json, render.keys_table, "no keys")

    run(ctx, body)


@keys_app.command("create")
def keys_create(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="who the key is for")], as_json: JsonOption = False
) -> None:
    """Issue a key (admin only). Its secret and webhook secret are shown this once."""

    def body(client: ApiClient) -> None:
        key = client.create_key(name)
        if as_json:
            typer.echo(json.dumps(key))
            return
        out().print(
            f"key {key['id']} ({key['name']})\ntoken:          {key['key']}\nwebhook secret: {key['webhook_secret']}",
            soft_wrap=True,
        )
        err().print("Store both now: they are not shown again.")

    run(ctx, body)


@keys_app.command("revoke")
def keys_revoke(ctx: typer.Context, key_id: Annotated[str, typer.Argument(metavar="KEY_ID")]) -> None:
    """Revoke a key at once (admin: any key; a key: itself). Its jobs and files stay."""
    run(ctx, lambda client: out().print(f"key {client.revoke_key(key_id)['id']} revoked"))
