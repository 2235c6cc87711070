"""What every `gs` command shares: the app, the connection, errors as exit codes, option parsing and output.

`gs`: train, audit, list, report and compare jobs of a Gradient Starvation service.

Exit codes: 0 the job (or command) succeeded; 1 the job failed; 2 bad usage; 3 the job was
cancelled; 4 the API said no or could not be reached; 130 interrupted while waiting (the job runs on).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cli import render
from cli.client import ApiClient, ApiFailure, JobStatus
from cli.config import ConfigError, Connection, resolve
from cli.watch import wait_with_progress

EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_API, EXIT_INTERRUPTED = 1, 2, 3, 4, 130

HELP = (
    "Train, audit, list, report and compare jobs of a Gradient Starvation service.\n\n"
    "Exit codes: 0 succeeded; 1 the job failed; 2 bad usage; 3 the job was cancelled; "
    "4 the API said no or could not be reached; 130 interrupted while waiting (the job runs on)."
)

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@dataclass
class State:
    url: str | None = None
    token: str | None = None

    def client(self) -> ApiClient:
        return connect(resolve(self.url, self.token))


def connect(connection: Connection) -> ApiClient:
    """Made once per command; tests replace it to talk to a fake server."""
    return ApiClient(connection)


def out() -> Console:
    # Piped output gets room for a job id and its columns; a terminal keeps its own width.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 140)


def err() -> Console:
    return Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 140)


def fail(message: str, code: int) -> typer.Exit:
    err().print(f"[red]error:[/red] {message}", soft_wrap=True)
    return typer.Exit(code)


URL_HELP = "API base URL (default: http://GS_HOST:GS_PORT)"
TOKEN_HELP = "API token (default: GS_ADMIN_TOKEN, then the server's token file var/admin_token)"


@app.callback()
def main_options(
    ctx: typer.Context,
    url: Annotated[str | None, typer.Option(envvar="GS_URL", help=URL_HELP)] = None,
    token: Annotated[str | None, typer.Option(envvar="GS_TOKEN", show_envvar=True, help=TOKEN_HELP)] = None,
) -> None:
    ctx.obj = State(url=url, token=token)


def run(ctx: typer.Context, body) -> Any:
    """Run `body(client)`, turning configuration and API errors into a message and an exit code."""
    state: State = ctx.obj
    try:
        client = state.client()
    except ConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    try:
        return body(client)
    except ApiFailure as failure:
        raise fail(failure.message, EXIT_API) from None
    finally:
        client.close()


def parse_tags(tags: list[str]) -> dict[str, str]:
    parsed = {}
    for item in tags:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise fail(f"--tag {item!r} is not of the form key=value", EXIT_USAGE)
        parsed[key] = value
    return parsed


def parse_ints(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise fail(f"{option} takes integers separated by commas, e.g. 0,1,2 (got {text!r})", EXIT_USAGE) from None


def parse_floats(text: str, option: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise fail(f"{option} takes numbers separated by commas, e.g. 0.5,2.5", EXIT_USAGE) from None


def parse_json(text: str | None, option: str, kind: type) -> Any:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise fail(f"{option} is not valid JSON: {exc}", EXIT_USAGE) from None
    if not isinstance(value, kind):
        raise fail(f"{option} must be a JSON {kind.__name__}", EXIT_USAGE)
    return value


def spec_with(spec_file: Path | None, **flags: Any) -> dict[str, Any]:
    """The JSON spec of --spec (or an empty one) with every flag that was given set over it."""
    spec: dict[str, Any] = parse_json(spec_file.read_text(), "--spec", dict) if spec_file else {}
    spec.update({key: value for key, value in flags.items() if value is not None})
    return spec


def finish(client: ApiClient, job: dict, wait: bool, as_json: bool) -> None:
    """Print the submitted job, or follow it to its end and exit with its outcome."""
    for warning in job.get("warnings") or []:
        err().print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    if not wait:
        if as_json:
            typer.echo(json.dumps(job))
        else:
            out().print(
                f"submitted {job['kind']} job [bold]{job['id']}[/bold] ({job['status']}); "
                f"follow it with: gs watch {job['id']}"
            )
        return
    console = err() if as_json else out()
    try:
        final = wait_with_progress(client, job, console)
    except KeyboardInterrupt:
        raise fail(
            f"stopped waiting; job {job['id']} goes on (gs watch {job['id']}, gs cancel {job['id']})", EXIT_INTERRUPTED
        ) from None
    show_outcome(client, final, as_json)


def show_outcome(client: ApiClient, job: dict, as_json: bool) -> None:
    report = client.report(job["id"]) if job["status"] == JobStatus.SUCCEEDED else None
    if as_json:
        typer.echo(json.dumps({"job": job, "report": report}))
    else:
        console = out()
        for table in render.outcome(job, report):
            console.print(table)
    if job["status"] == JobStatus.FAILED:
        error = job.get("error") or {}
        raise fail(f"job {job['id']} failed: {error.get('code', 'unknown')}: {error.get('message', '')}", EXIT_FAILED)
    if job["status"] == JobStatus.CANCELLED:
        raise fail(f"job {job['id']} was cancelled", EXIT_CANCELLED)


def show_list(items: list[dict], as_json: bool, table: Callable[[list[dict]], Any], empty: str) -> None:
    if as_json:
        typer.echo(json.dumps(items))
    else:
        out().print(table(items) if items else empty)


WaitOption = Annotated[bool, typer.Option("--wait/--no-wait", help="follow the job to its end with a progress bar")]
JsonOption = Annotated[bool, typer.Option("--json", help="print JSON instead of tables")]
TagOption = Annotated[list[str], typer.Option("--tag", help="key=value, repeatable")]
