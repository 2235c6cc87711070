"""`gs` against the real service (API + worker on the embedded default)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.app import app
from tests.conftest import ADMIN_TOKEN
from tests.fixtures_models import ColourOnly, torchscript_bytes

runner = CliRunner()


@pytest.fixture
def gs(embedded_stack):
    env = {"GS_URL": str(embedded_stack.client.base_url), "GS_TOKEN": ADMIN_TOKEN}

    def invoke(*args: str):
        return runner.invoke(app, list(args), env=env)

    return invoke


def test_train_wait_follows_the_job_and_ends_with_its_results(gs, tmp_path):
    result = gs("train", "--preset", "paper_cmnist_erm", "--steps", "20", "--eval-every", "10", "--seeds", "0",
                "--no-audit", "--tag", "suite=cli", "--wait")
    assert result.exit_code == 0, result.output
    assert "step 20/20" in result.output and "test acc" in result.output  # the last line of the progress bar
    assert "Final metrics over 1 seed(s)" in result.output and "succeeded" in result.output

    listed = gs("jobs", "--tag", "suite=cli", "--json")
    assert listed.exit_code == 0, listed.output
    (job,) = json.loads(listed.output)
    assert job["status"] == "succeeded" and job["spec"]["steps"] == 20

    shown = gs("report", job["id"][:12])  # the id as `gs jobs` shows it
    assert shown.exit_code == 0 and job["id"] in shown.output and "test" in shown.output
    assert job["id"][:12] in gs("jobs", "--tag", "suite=cli").output

    logged = gs("logs", "-f", job["id"][:12])  # the job has finished: the whole log, then the command ends
    assert logged.exit_code == 0 and "step 20/20: test accuracy" in logged.output and "succeeded after" in logged.output

    files = gs("artifacts", job["id"][:12], "--json")
    assert files.exit_code == 0, files.output
    listed = json.loads(files.stdout)
    assert {a["media_type"] for a in listed if a["name"].endswith((".pt", ".safetensors"))} == {
        "application/octet-stream"}  # weights, not what Python's table guesses for .pt
    artifact = listed[0]
    saved = tmp_path / "saved.bin"
    fetched = gs("download", job["id"], artifact["name"], "-o", str(saved))
    assert fetched.exit_code == 0, fetched.output
    assert saved.stat().st_size == artifact["size_bytes"] > 0
    assert gs("download", job["id"], "no-such-file", "-o", str(tmp_path / "x")).exit_code == 4


def test_audit_uploads_a_checkpoint_and_compare_puts_two_jobs_side_by_side(gs, tmp_path):
    model = tmp_path / "colour_reader.pt"
    model.write_bytes(torchscript_bytes(ColourOnly()))
    result = gs("audit", "--checkpoint", str(model), "--format", "torchscript", "--dataset", "colored_mnist",
                "--probe", "groups", "--probe", "counterfactual", "--json", "--wait")
    assert result.exit_code == 0, result.output
    outcome = json.loads(result.stdout)
    assert outcome["job"]["status"] == "succeeded" and outcome["report"]["summary"]["verdict"] == "high"
    assert "uploaded colour_reader.pt as checkpoint" in result.stderr

    other = gs("audit", "--checkpoint-id", outcome["job"]["spec"]["checkpoint_id"], "--probe", "groups")
    assert other.exit_code == 0 and "submitted audit job" in other.output
    other_id = other.output.split("job ")[1].split()[0]

    listed = gs("checkpoints", "--json")
    assert outcome["job"]["spec"]["checkpoint_id"] in [c["id"] for c in json.loads(listed.stdout)]
    assert "upload" in gs("checkpoints").output

    compared = gs("compare", outcome["job"]["id"], other_id)
    assert compared.exit_code == 0, compared.output
    assert "flip rate" in compared.output and "high" in compared.output


def test_repair_waits_and_prints_the_before_and_after_table(gs, embedded_stack):
    import io

    from tests.e2e.test_repair_flow import script_bytes
    from tests.science.repair_fixtures import erm_colored_mnist

    uploaded = embedded_stack.client.post(
        "/v1/checkpoints", files={"file": ("erm.pt", io.BytesIO(script_bytes(erm_colored_mnist())))},
        data={"format": "torchscript"}).json()
    result = gs("repair", uploaded["id"], "--dataset", "colored_mnist", "--probe", "groups", "--probe",
                "counterfactual", "--wait")
    assert result.exit_code == 0, result.output
    assert "before and after" in result.output and "flip rate" in result.output and "last_layer" in result.output
    assert gs("repair").exit_code != 0  # neither a checkpoint nor a train job


def test_keys_are_created_listed_and_revoked_from_the_cli(gs, embedded_stack):
    created = gs("keys", "create", "cli-tenant", "--json")
    assert created.exit_code == 0, created.output
    key = json.loads(created.stdout)
    assert key["key"] and key["webhook_secret"]
    assert key["id"] in gs("keys", "list").output

    def as_tenant(*args: str):
        env = {"GS_URL": str(embedded_stack.client.base_url), "GS_TOKEN": key["key"]}
        return runner.invoke(app, list(args), env=env)

    assert as_tenant("checkpoints").output.strip() == "no checkpoints"  # a tenant of its own
    assert as_tenant("keys", "create", "not-admin").exit_code == 4
    assert gs("keys", "revoke", key["id"]).exit_code == 0
    refused = as_tenant("checkpoints")
    assert refused.exit_code == 4 and "401" in refused.output
    (listed,) = [k for k in json.loads(gs("keys", "list", "--json").stdout) if k["id"] == key["id"]]
    assert listed["revoked_at"]


def test_spec_flags_reach_the_preset_and_a_warm_up_longer_than_the_run_is_warned_about(gs):
    result = gs("train", "--preset", "paper_cmnist_sd", "--steps", "5", "--sd-lambda", "0.5", "--sd-gamma", "0.5,2.5",
                "--lr", "0.01", "--no-audit", "--json")
    assert result.exit_code == 0, result.output
    spec = json.loads(result.stdout)["spec"]
    assert spec["method"]["name"] == "sd" and spec["method"]["sd_lambda"] == 0.5
    assert spec["method"]["sd_gamma"] == [0.5, 2.5] and spec["method"]["warmup_steps"] == 450  # the preset's
    assert spec["optimizer"] == {**spec["optimizer"], "name": "adam", "lr": 0.01}
    assert "warning:" in result.stderr and "warm-up" in result.stderr
    assert gs("train", "--preset", "paper_cmnist_sd", "--sd-gamma", "x").exit_code == 2


def test_sweep_waits_and_prints_every_setting_with_the_chosen_one_marked(gs, tmp_path):
    spec = {"dataset": {"name": "colored_mnist", "params": {"n_train": 600}}, "eval_every": 10,
            "method": {"warmup_steps": 5}}
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    result = gs("sweep", "--preset", "paper_cmnist_sd", "--spec", str(spec_file), "--steps", "20", "--seeds", "0",
                "--grid", "method.sd_lambda=0,2", "--grid", "method.sd_gamma=[0, [1, 0.5]]", "--no-audit",
                "--selection", "oracle", "--wait")
    assert result.exit_code == 0, result.output
    assert "warning" not in result.output
    assert "chosen by oracle (worst_group_accuracy on test) — oracle: chosen on the TEST split" in result.output
    rows = [line for line in result.output.splitlines() if "sd_lambda=" in line]
    assert len(rows) == 4 and sum("◀ chosen" in row for row in rows) == 1
    assert 'sd_gamma=[1, 0.5]' in rows[1] or 'sd_gamma=[1.0, 0.5]' in rows[1]
    assert gs("sweep", "--grid", "sd_lambda").exit_code == 2  # no '='


def test_register_folder_waits_for_the_check_and_datasets_lists_its_status(gs, embedded_stack):
    from tests.science.test_image_folders import coloured_folder

    root = embedded_stack.var_dir / "data" / "cli-faces"
    if not root.exists():
        coloured_folder(root)
    registered = gs("register-folder", "cli-faces", "--image-size", "8", "--wait", "--json")
    assert registered.exit_code == 0, registered.output
    dataset = json.loads(registered.output)
    assert dataset["status"] == "ready" and dataset["description"]["splits"] == {"train": 48, "test": 24}

    (root / "broken.csv").write_text("path,label,attribute\nimg/none.png,0,1\n")
    broken = gs("register-folder", "cli-faces", "--metadata", "broken.csv", "--wait")
    assert broken.exit_code == 1 and "failed" in broken.output and "line 2" in broken.output
    listed = gs("datasets")
    assert listed.exit_code == 0 and dataset["id"] in listed.output and "colored_mnist" in listed.output
