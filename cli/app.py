"""`gs`: train, audit, list, report and compare jobs of a Gradient Starvation service.

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


@app.command()
def train(
    ctx: typer.Context,
    preset: Annotated[str | None, typer.Option(help="e.g. paper_cmnist_sd, paper_cmnist_erm, paper_moons_sd")] = None,
    steps: Annotated[int | None, typer.Option(min=1)] = None,
    seeds: Annotated[str | None, typer.Option(help="comma-separated, e.g. 0,1,2")] = None,
    eval_every: Annotated[int | None, typer.Option(min=1)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="default: full batch")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda | cuda:N")] = None,
    method: Annotated[
        str | None, typer.Option(help="erm | sd | weight_decay | irm | group_dro (default: the preset's)")
    ] = None,
    sd_lambda: Annotated[float | None, typer.Option(help="SD: strength of the logit penalty")] = None,
    sd_gamma: Annotated[str | None, typer.Option(help="SD: logit target, one value or one per class (0.5,2.5)")] = None,
    warmup_steps: Annotated[int | None, typer.Option(min=0, help="SD: steps before the penalty applies")] = None,
    weight_decay: Annotated[float | None, typer.Option(help="weight_decay: the L2 coefficient")] = None,
    lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
    optimizer: Annotated[str | None, typer.Option(help="adam | sgd")] = None,
    audit: Annotated[bool | None, typer.Option("--audit/--no-audit", help="audit each trained model")] = None,
    spec_file: Annotated[
        Path | None,
        typer.Option("--spec", exists=True, dir_okay=False, help="a JSON train spec; the flags above override it"),
    ] = None,
    tag: TagOption = [],  # noqa: B006
    wait: WaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Train one model per seed (with or without Spectral Decoupling) and optionally audit them."""
    spec = spec_with(
        spec_file,
        preset=preset,
        steps=steps,
        eval_every=eval_every,
        batch_size=batch_size,
        device=device,
        audit=audit,
        seeds=parse_ints(seeds, "--seeds") if seeds else None,
    )
    gamma = None if sd_gamma is None else parse_floats(sd_gamma, "--sd-gamma")
    sections: dict[str, dict[str, Any]] = {
        "method": {
            "name": method,
            "sd_lambda": sd_lambda,
            "sd_gamma": gamma[0] if gamma and len(gamma) == 1 else gamma,
            "warmup_steps": warmup_steps,
            "weight_decay": weight_decay,
        },
        "optimizer": {"name": optimizer, "lr": lr},
    }
    for section, fields in sections.items():  # merged into the preset's section by the server, name kept
        given = {k: v for k, v in fields.items() if v is not None}
        if given:
            spec[section] = {**spec.get(section, {}), **given}
    if not spec:
        raise fail("give --preset (e.g. paper_cmnist_sd) or --spec FILE", EXIT_USAGE)
    tags = parse_tags(tag)
    run(ctx, lambda client: finish(client, client.submit_job("train", spec, tags), wait, as_json))


@app.command()
def audit(
    ctx: typer.Context,
    checkpoint: Annotated[Path | None, typer.Option(exists=True, dir_okay=False, help="a model file to upload")] = None,
    format: Annotated[str, typer.Option("--format", help="torchscript | onnx | safetensors")] = "torchscript",
    checkpoint_id: Annotated[str | None, typer.Option(help="audit a checkpoint already uploaded")] = None,
    train_job: Annotated[str | None, typer.Option(help="audit the models of a finished train job")] = None,
    dataset: Annotated[str, typer.Option(help="built-in name or registered dataset id")] = "colored_mnist",
    dataset_params: Annotated[str | None, typer.Option(help='JSON object, e.g. {"color_flip_test": 0.9}')] = None,
    attribute: Annotated[str, typer.Option(help="the spurious attribute")] = "color",
    probe: Annotated[list[str], typer.Option("--probe", help="repeatable; default: every probe")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option(min=0)] = 0,
    arch: Annotated[str | None, typer.Option(help="safetensors: the built-in architecture")] = None,
    arch_params: Annotated[str | None, typer.Option(help="safetensors: JSON object")] = None,
    input_shape: Annotated[str | None, typer.Option(help="e.g. 2,14,14")] = None,
    num_classes: Annotated[int | None, typer.Option(min=2)] = None,
    tag: TagOption = [],  # noqa: B006
    wait: WaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Upload a model (or name one) and audit it for reliance on a spurious attribute."""
    if sum(x is not None for x in (checkpoint, checkpoint_id, train_job)) != 1:
        raise fail("give exactly one of --checkpoint FILE, --checkpoint-id ID and --train-job ID", EXIT_USAGE)
    if format not in ("torchscript", "onnx", "safetensors"):
        raise fail(f"--format must be torchscript, onnx or safetensors (got {format!r})", EXIT_USAGE)
    fields = {"format": format}
    if arch:
        fields["arch"] = arch
    if arch_params:
        fields["arch_params"] = json.dumps(parse_json(arch_params, "--arch-params", dict))
    if input_shape:
        fields["input_shape"] = json.dumps(parse_ints(input_shape, "--input-shape"))
    if num_classes:
        fields["num_classes"] = str(num_classes)
    spec: dict[str, Any] = {
        "dataset": {"name": dataset, "params": parse_json(dataset_params, "--dataset-params", dict) or {}},
        "spurious_attribute": attribute,
        "seed": seed,
    }
    if probe:
        spec["probes"] = probe
    tags = parse_tags(tag)

    def body(client: ApiClient) -> None:
        if checkpoint is not None:
            uploaded = client.upload_checkpoint(checkpoint, fields)
            (err() if as_json else out()).print(f"uploaded {checkpoint.name} as checkpoint {uploaded['id']}")
            spec["checkpoint_id"] = uploaded["id"]
        elif checkpoint_id:
            spec["checkpoint_id"] = checkpoint_id
        else:
            spec["train_job_id"] = train_job
        finish(client, client.submit_job("audit", spec, tags), wait, as_json)

    run(ctx, body)


@app.command()
def repair(
    ctx: typer.Context,
    checkpoint_id: Annotated[
        str | None, typer.Argument(metavar="CHECKPOINT", help="the checkpoint id to repair")
    ] = None,
    train_job: Annotated[str | None, typer.Option(help="repair a seed of a finished train job instead")] = None,
    seed: Annotated[
        int, typer.Option(min=0, help="the train job's seed; also seeds the data and the validation part")
    ] = 0,
    dataset: Annotated[str, typer.Option(help="built-in name or registered dataset id")] = "colored_mnist",
    dataset_params: Annotated[str | None, typer.Option(help='JSON object, e.g. {"color_flip_test": 0.9}')] = None,
    attribute: Annotated[str, typer.Option(help="the spurious attribute")] = "color",
    method: Annotated[str, typer.Option(help="last_layer | last_layer_sd | finetune_sd")] = "last_layer",
    method_params: Annotated[str | None, typer.Option(help='JSON object, e.g. {"inverse_strengths": [0.1, 1]}')] = None,
    layer: Annotated[str | None, typer.Option(help="the feature layer (the head's input), by name")] = None,
    probe: Annotated[list[str], typer.Option("--probe", help="repeatable; default: every probe")] = [],  # noqa: B006
    tag: TagOption = [],  # noqa: B006
    wait: WaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Refit a checkpoint's head so it leans less on a spurious attribute; audits before and after."""
    if (checkpoint_id is None) == (train_job is None):
        raise fail("give exactly one of CHECKPOINT and --train-job ID", EXIT_USAGE)
    spec: dict[str, Any] = {
        "dataset": {"name": dataset, "params": parse_json(dataset_params, "--dataset-params", dict) or {}},
        "spurious_attribute": attribute,
        "seed": seed,
        "method": {**(parse_json(method_params, "--method-params", dict) or {}), "name": method},
    }
    spec["checkpoint_id" if checkpoint_id else "train_job_id"] = checkpoint_id or train_job
    if layer:
        spec["layer"] = layer
    if probe:
        spec["probes"] = probe
    tags = parse_tags(tag)
    run(ctx, lambda client: finish(client, client.submit_job("repair", spec, tags), wait, as_json))


def parse_grid(items: list[str]) -> dict[str, list]:
    """["method.sd_lambda=0.5,1,2", "method.sd_gamma=[0, [1, 0.5]]"] as the grid: numbers, or a JSON list."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key:
            raise fail(f"--grid {item!r}: give PARAMETER=VALUES, e.g. method.sd_lambda=0.5,1,2", EXIT_USAGE)
        grid[key] = (
            parse_json(values, f"--grid {key}", list)
            if values.lstrip().startswith("[")
            else parse_floats(values, f"--grid {key}")
        )
    return grid


@app.command()
def sweep(
    ctx: typer.Context,
    grid: Annotated[
        list[str],
        typer.Option(
            "--grid",
            help="PARAMETER=VALUES, repeatable: method.sd_lambda=0.5,1,2 "
            "or a JSON list (method.sd_gamma='[0, [1, 0.5]]')",
        ),
    ],
    preset: Annotated[
        str | None, typer.Option(help="the train spec the settings start from, e.g. paper_cmnist_sd")
    ] = None,
    steps: Annotated[int | None, typer.Option(min=1)] = None,
    seeds: Annotated[str | None, typer.Option(help="comma-separated, e.g. 0,1")] = None,
    selection: Annotated[str, typer.Option(help="train_domain_validation | oracle (chooses on the test split)")] = (
        "train_domain_validation"
    ),
    holdout: Annotated[float | None, typer.Option(help="fraction of the training data held out to choose on")] = None,
    audit: Annotated[bool | None, typer.Option("--audit/--no-audit", help="audit the chosen setting's models")] = None,
    spec_file: Annotated[
        Path | None,
        typer.Option("--spec", exists=True, dir_okay=False, help="a JSON train spec; the options above override it"),
    ] = None,
    tag: TagOption = [],  # noqa: B006
    wait: WaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Train every setting of a grid x every seed as one job and choose one setting; prints the table."""
    spec = spec_with(
        spec_file,
        preset=preset,
        steps=steps,
        holdout=holdout,
        audit=audit,
        seeds=parse_ints(seeds, "--seeds") if seeds else None,
        grid=parse_grid(grid),
        selection=selection,
    )
    tags = parse_tags(tag)
    run(ctx, lambda client: finish(client, client.submit_job("sweep", spec, tags), wait, as_json))


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


def main() -> None:
    app(prog_name="gs")


if __name__ == "__main__":
    main()
