"""`gs jobs`, `report`, `compare`, `watch`, `cancel`, `logs`, and the files: `checkpoints`, `datasets`,
`register-folder`, `artifacts`, `download`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cli import render
from cli.base import (
    EXIT_API,
    EXIT_FAILED,
    JsonOption,
    app,
    err,
    fail,
    finish,
    out,
    run,
    show_list,
)
from cli.client import ApiClient, JobStatus


@app.command()
def jobs(
    ctx: typer.Context,
    status: Annotated[str | None, typer.Option(help=" | ".join(JobStatus))] = None,
    kind: Annotated[str | None, typer.Option(help="train | audit | repair | sweep")] = None,
    tag: Annotated[list[str], typer.Option("--tag", help="key:value or key=value, repeatable")] = [],  # noqa: B006
    limit: Annotated[int, typer.Option(min=1, max=500)] = 20,
    as_json: JsonOption = False,
) -> None:
    """List your jobs, newest first."""
    tags = [t.replace("=", ":", 1) if ":" not in t else t for t in tag]

    def body(client: ApiClient) -> None:
        show_list(client.jobs(status=status, kind=kind, tags=tags, limit=limit), as_json, render.jobs_table, "no jobs")

    run(ctx, body)


@app.command()
def report(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB")],
    html: Annotated[Path | None, typer.Option(help="also save the report page (with plots) to this file")] = None,
    as_json: JsonOption = False,
) -> None:
    """Show a job's outcome: final metrics and its reliance report."""

    def body(client: ApiClient) -> None:
        job = client.job(job_id)
        found = client.report(job_id) if job["status"] == JobStatus.SUCCEEDED else None
        if html is not None:
            if found is None:
                raise fail(f"job {job_id} has no report (status {job['status']})", EXIT_API)
            html.write_text(client.report_html(job_id))
            err().print(f"saved {html}")
        if as_json:
            typer.echo(json.dumps({"job": job, "report": found}))
            return
        console = out()
        for table in render.outcome(job, found):
            console.print(table)

    run(ctx, body)


@app.command()
def compare(
    ctx: typer.Context,
    job_a: Annotated[str, typer.Argument(metavar="JOB_A")],
    job_b: Annotated[str, typer.Argument(metavar="JOB_B")],
    as_json: JsonOption = False,
) -> None:
    """Two jobs side by side, e.g. ERM against SD: accuracy, starvation and reliance."""

    def body(client: ApiClient) -> None:
        pairs = []
        for job_id in (job_a, job_b):
            job = client.job(job_id)
            pairs.append((job, client.report(job_id) if job["status"] == JobStatus.SUCCEEDED else None))
        if as_json:
            typer.echo(json.dumps([{"job": j, "report": r} for j, r in pairs]))
        else:
            out().print(render.compare_table(pairs[0], pairs[1]))

    run(ctx, body)


@app.command()
def watch(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="JOB")], as_json: JsonOption = False
) -> None:
    """Follow a job to its end (exit code as with --wait)."""
    run(ctx, lambda client: finish(client, client.job(job_id), True, as_json))


@app.command()
def cancel(ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="JOB")]) -> None:
    """Cancel a queued or running job."""

    def body(client: ApiClient) -> None:
        job = client.cancel(job_id)
        out().print(f"job {job_id}: {job['status']}" + (" (stopping)" if job["status"] == JobStatus.RUNNING else ""))

    run(ctx, body)


@app.command()
def logs(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing lines until the job ends")] = False,
    as_json: JsonOption = False,
) -> None:
    """A job's own log: its start, each evaluation, warnings and how it ended."""

    def body(client: ApiClient) -> None:
        console = out()
        for line in client.follow_logs(job_id) if follow else client.logs(job_id):
            if as_json:
                typer.echo(json.dumps(line))
            else:
                console.print(render.log_line(line), soft_wrap=True)

    run(ctx, body)


@app.command()
def checkpoints(
    ctx: typer.Context, limit: Annotated[int, typer.Option(min=1, max=500)] = 50, as_json: JsonOption = False
) -> None:
    """List your checkpoints: uploads, those train jobs made, repaired ones."""

    def body(client: ApiClient) -> None:
        show_list(client.checkpoints(limit=limit), as_json, render.checkpoints_table, "no checkpoints")

    run(ctx, body)


@app.command()
def datasets(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the built-in datasets and yours, with the status of each image folder's check."""

    def body(client: ApiClient) -> None:
        show_list(client.datasets(), as_json, render.datasets_table, "no datasets")

    run(ctx, body)


@app.command("register-folder")
def register_folder(
    ctx: typer.Context,
    folder: Annotated[
        str,
        typer.Argument(
            help="the image folder, a path inside your key's folder on the server, GS_DATA_DIR/<key id>, or "
            "s3://BUCKET/PREFIX/<key id>/... under a prefix of GS_DATA_URLS"
        ),
    ],
    name: Annotated[str | None, typer.Option(help="the dataset's name (default: the folder's)")] = None,
    metadata: Annotated[
        str, typer.Option(help="the CSV in the folder: path,label,attribute[,split][,counterfactual]")
    ] = "metadata.csv",
    image_size: Annotated[int, typer.Option(min=4, max=512, help="images are resized to this many pixels a side")] = 64,
    wait: Annotated[bool, typer.Option("--wait", help="wait for the background check and say how it ended")] = False,
    as_json: JsonOption = False,
) -> None:
    """Register an image folder (CelebA/Waterbirds layout); the service checks it in the background."""
    import time

    def body(client: ApiClient) -> None:
        dataset = client.create(
            "/v1/datasets",
            data={
                "name": name or Path(folder).name,
                "format": "image_folder",
                "folder": folder,
                "metadata": metadata,
                "image_size": str(image_size),
            },
        )
        while wait and dataset["status"] == "pending":
            time.sleep(1)
            dataset = client.get(f"/v1/datasets/{dataset['id']}")
        if as_json:
            typer.echo(json.dumps(dataset))
        else:
            out().print(render.datasets_table([dataset]))
        if dataset["status"] == "failed":
            raise typer.Exit(EXIT_FAILED)

    run(ctx, body)


@app.command()
def artifacts(
    ctx: typer.Context, job_id: Annotated[str, typer.Argument(metavar="JOB")], as_json: JsonOption = False
) -> None:
    """List a job's files (plots, reports, checkpoints); fetch one with `gs download`."""

    def body(client: ApiClient) -> None:
        show_list(
            client.artifacts(job_id),
            as_json,
            lambda items: render.artifacts_table(job_id, items),
            f"job {job_id} has no artifacts",
        )

    run(ctx, body)


@app.command()
def download(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="JOB")],
    name: Annotated[str, typer.Argument(metavar="NAME", help="an artifact's name (see `gs artifacts JOB`)")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="file to write (default: NAME here)")] = None,
) -> None:
    """Save one of a job's artifacts."""
    target = output or Path(Path(name).name)

    def body(client: ApiClient) -> None:
        written = client.download(f"/v1/jobs/{job_id}/artifacts/{name}", target)
        err().print(f"saved {target} ({render.size(written)})")

    run(ctx, body)
