"""A Python client generated from the served /openapi.json by openapi-python-client, used as an integrator
would: train, wait, read metrics, upload a checkpoint, audit it, read the report, through the client alone.

Generating it here from the live document is also the drift check: the client is never kept in the repo, so
it cannot fall behind the API. The generator lives in its own virtual environment (`make install` makes
.venv-codegen): its pins (typer<0.28) conflict with the CLI's.
"""
from __future__ import annotations

import importlib
import io
import json
import subprocess
import sys
import time

import pytest

from tests.conftest import ADMIN_TOKEN, ROOT

GENERATOR = ROOT / ".venv-codegen" / "bin" / "openapi-python-client"
PACKAGE = "gs_generated_client"
# A tiny train job: one seed, 20 steps, no audit (the audit job below does it).
TINY_TRAIN = {"preset": "paper_cmnist_erm", "steps": 20, "eval_every": 10, "seeds": [0], "audit": False}


@pytest.fixture(scope="module")
def generated(embedded_stack, tmp_path_factory):
    """The generated package, imported; fails (never skips) without the generator."""
    if not GENERATOR.exists():
        pytest.fail(f"{GENERATOR} is missing: run `make install`")
    folder = tmp_path_factory.mktemp("generated-client")
    document = folder / "openapi.json"
    document.write_text(json.dumps(embedded_stack.client.get("/openapi.json").json()))
    config = folder / "config.json"  # no post-hooks: ruff need not be on PATH
    config.write_text(json.dumps({"post_hooks": [], "package_name_override": PACKAGE}))
    run = subprocess.run(
        [str(GENERATOR), "generate", "--path", str(document), "--config", str(config), "--meta", "none",
         "--output-path", str(folder / PACKAGE)],
        capture_output=True, text=True, timeout=120,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output
    assert "Warning" not in output, output  # every operation and schema was understood
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(folder))


def wait_until_finished(client, job_id: str, timeout_s: float = 90):
    from gs_generated_client.api.jobs import get_job

    terminal = {"succeeded", "failed", "cancelled"}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = get_job.sync(job_id, client=client)
        if job.status.value in terminal:
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} is {job.status} after {timeout_s}s")


def test_a_generated_client_trains_uploads_audits_and_reads_the_report(generated, embedded_stack):
    from gs_generated_client.api.checkpoints import download_checkpoint, upload_checkpoint
    from gs_generated_client.api.jobs import create_job, get_report, list_job_metrics, list_jobs
    from gs_generated_client.models import (
        AuditJobCreate,
        AuditJobOut,
        BodyUploadCheckpoint,
        BodyUploadCheckpointFormat,
        JobKind,
        Report,
        TrainJobCreate,
        TrainJobOut,
    )
    from gs_generated_client.types import File

    client = generated.AuthenticatedClient(base_url=str(embedded_stack.client.base_url), token=ADMIN_TOKEN)

    submitted = create_job.sync(client=client, body=TrainJobCreate.from_dict({"kind": "train", "spec": TINY_TRAIN}))
    assert isinstance(submitted, TrainJobOut), submitted
    trained = wait_until_finished(client, submitted.id)
    assert isinstance(trained, TrainJobOut) and trained.status.value == "succeeded", trained.error
    accuracy = trained.result.splits["test"].accuracy.mean
    assert 0.0 <= accuracy <= 1.0
    listed = list_jobs.sync(client=client, kind=JobKind.TRAIN)
    assert submitted.id in [job.id for job in listed.items]

    metrics = list_job_metrics.sync(submitted.id, client=client, name="accuracy")
    assert sorted({m.step for m in metrics.items}) == [0, 10, 20]

    # The trained network's TorchScript file, downloaded and uploaded again as any user's model would be.
    (checkpoints,) = trained.result.checkpoints
    downloaded = download_checkpoint.sync(checkpoints.torchscript, client=client)
    assert isinstance(downloaded, File), downloaded  # bytes, not parsed as JSON
    model_bytes = downloaded.payload.read()
    assert model_bytes[:2] == b"PK"  # a TorchScript zip
    upload = BodyUploadCheckpoint(file=File(payload=io.BytesIO(model_bytes), file_name="model.pt"),
                                  format_=BodyUploadCheckpointFormat.TORCHSCRIPT)
    checkpoint = upload_checkpoint.sync(client=client, body=upload)
    assert checkpoint.size_bytes == len(model_bytes), checkpoint

    spec = {"checkpoint_id": checkpoint.id, "dataset": {"name": "colored_mnist"}, "spurious_attribute": "color",
            "probes": ["groups", "counterfactual"]}
    audit = create_job.sync(client=client, body=AuditJobCreate.from_dict({"kind": "audit", "spec": spec}))
    audited = wait_until_finished(client, audit.id)
    assert isinstance(audited, AuditJobOut) and audited.status.value == "succeeded", audited.error

    report = get_report.sync(audit.id, client=client)
    assert isinstance(report, Report), report
    assert 0.0 <= report.counterfactual.flip_rate <= 1.0
    assert report.summary.basis.value == "counterfactual"
    assert audited.result.summary.verdict == report.summary.verdict
