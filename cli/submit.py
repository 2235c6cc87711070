"""`gs train`, `audit`, `repair` and `sweep`: the commands that submit a job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from cli.base import (
    EXIT_USAGE,
    JsonOption,
    TagOption,
    WaitOption,
    app,
    err,
    fail,
    finish,
    out,
    parse_floats,
    parse_ints,
    parse_json,
    parse_tags,
    run,
    spec_with,
)
from cli.client import ApiClient


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
