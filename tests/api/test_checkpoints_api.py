"""Uploading models: checked before they are kept, never unpickled, refused with a clear 4xx."""
from __future__ import annotations

import hashlib

import pytest
from torch import nn

from tests.fixtures_models import ColourBlind, ColourOnly, malicious_pickle, onnx_bytes, torchscript_bytes


def upload(client, headers, content: bytes, fmt: str, name: str = "model.pt", **fields):
    return client.post(
        "/v1/checkpoints", files={"file": (name, content)}, data={"format": fmt, **fields}, headers=headers
    )


def stored_files(settings) -> set[str]:
    folder = settings.storage_dir / "checkpoints"
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture
def settings():
    from core.settings import get_settings

    return get_settings()


def test_torchscript_upload_is_kept_and_downloadable(client, tenant):
    headers = tenant()
    content = torchscript_bytes(ColourOnly())
    response = upload(client, headers, content, "torchscript")
    assert response.status_code == 201, response.text
    checkpoint = response.json()
    assert checkpoint["sha256"] == hashlib.sha256(content).hexdigest()
    assert checkpoint["size_bytes"] == len(content)
    assert client.get(f"/v1/checkpoints/{checkpoint['id']}", headers=headers).json()["id"] == checkpoint["id"]
    assert client.get(f"/v1/checkpoints/{checkpoint['id']}/file", headers=headers).content == content
    assert checkpoint["id"] in [c["id"] for c in client.get("/v1/checkpoints", headers=headers).json()["items"]]
    assert client.get(f"/v1/checkpoints/{checkpoint['id']}", headers=tenant("other")).status_code == 404


def test_onnx_upload_is_accepted(client, tenant):
    response = upload(client, tenant(), onnx_bytes(ColourBlind()), "onnx", name="m.onnx")
    assert response.status_code == 201, response.text


def test_malicious_pickle_never_runs_and_is_not_stored(client, tenant, tmp_path, settings):
    marker = tmp_path / "pwned"
    before = stored_files(settings)
    for fmt in ("torchscript", "safetensors", "onnx"):
        response = upload(client, tenant(), malicious_pickle(marker), fmt, arch="mlp")
        assert 400 <= response.status_code < 500, response.text
        assert response.json()["error"]["code"] in {"bad_format", "format_mismatch"}
    assert not marker.exists()
    assert stored_files(settings) == before


@pytest.mark.parametrize(
    "make, fmt, code",
    [
        (lambda: b"", "torchscript", "empty_file"),
        (lambda: torchscript_bytes(ColourOnly())[:300], "torchscript", None),
        (lambda: onnx_bytes(ColourOnly()), "torchscript", "format_mismatch"),
        (lambda: torchscript_bytes(ColourOnly()), "onnx", "format_mismatch"),
        (lambda: onnx_bytes(nn.Sequential(nn.Flatten(), nn.Linear(300, 1)), input_shape=(3, 10, 10)), "onnx", None),
        (lambda: b"\x00" * 64, "safetensors", None),
    ],
    ids=["empty", "truncated", "onnx-as-torchscript", "torchscript-as-onnx", "onnx-wrong-input", "garbage"],
)
def test_bad_uploads_get_422_and_are_not_stored(client, tenant, settings, make, fmt, code):
    before = stored_files(settings)
    response = upload(client, tenant(), make(), fmt, arch="mlp")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["message"]
    if code:
        assert error["code"] == code
    assert stored_files(settings) == before


def test_oversize_upload_is_413(client, tenant, settings, monkeypatch):
    monkeypatch.setattr(settings, "max_upload_bytes", 1000)
    before = stored_files(settings)
    response = upload(client, tenant(), torchscript_bytes(ColourOnly()), "torchscript")
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
    assert stored_files(settings) == before


def test_bad_form_fields_are_422(client, tenant):
    content = torchscript_bytes(ColourOnly())
    assert upload(client, tenant(), content, "pickle").status_code == 422
    assert upload(client, tenant(), content, "torchscript", input_shape="[2, -1]").status_code == 422
    assert upload(client, tenant(), content, "torchscript", input_shape="nope").status_code == 422
    assert upload(client, tenant(), content, "safetensors").json()["error"]["message"].count("arch") >= 1


class Forever(nn.Module):
    def forward(self, x):
        y = x.sum()
        while bool(y > -1):  # never ends for inputs in [0, 1]
            y = y + 1
        return x.flatten(1)[:, :1]


def test_a_model_that_never_returns_times_out_and_the_next_upload_works(client, tenant, settings, monkeypatch):
    monkeypatch.setattr(settings, "upload_check_timeout_s", 8)
    before = stored_files(settings)
    response = upload(client, tenant(), torchscript_bytes(Forever()), "torchscript")
    assert response.status_code == 422 and "longer than 8 s" in response.json()["error"]["message"]
    assert stored_files(settings) == before
    assert upload(client, tenant(), torchscript_bytes(ColourOnly()), "torchscript").status_code == 201


def test_a_retry_or_the_same_bytes_again_costs_no_second_model_check(client, tenant, settings, monkeypatch):
    headers = tenant()
    content = torchscript_bytes(ColourOnly())
    first = upload(client, {**headers, "Idempotency-Key": "upload-1"}, content, "torchscript")
    assert first.status_code == 201, first.text
    before = stored_files(settings)
    monkeypatch.setattr(settings, "upload_checks_per_key", 0)  # from here on, any model check is refused (429)
    retry = upload(client, {**headers, "Idempotency-Key": "upload-1"}, content, "torchscript")
    assert (retry.status_code, retry.json()) == (201, first.json())
    again = upload(client, headers, content, "torchscript")
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])
    assert upload(client, headers, content, "torchscript", num_classes="3").status_code == 429  # another card
    assert upload(client, tenant("other"), content, "torchscript").status_code == 429  # another owner's upload
    assert stored_files(settings) == before


def test_a_train_job_starts_only_from_the_owners_safetensors_of_its_arch(client, tenant):
    import json

    from safetensors.torch import save

    from starvation.networks import build_network
    from tests.fixtures_models import ColourOnly, torchscript_bytes

    headers, other = tenant(), tenant("other")
    network = build_network("resnet18", {"width": 8}, (2, 14, 14), 1000)
    torchvision_named = {("fc." + k[5:] if k.startswith("head.") else k[len("features."):]): v
                         for k, v in network.state_dict().items()}
    weights = upload(client, headers, save(torchvision_named), "safetensors", name="r18.safetensors", arch="resnet18",
                     arch_params=json.dumps({"width": 8}), input_shape="[2, 14, 14]", num_classes="1000")
    assert weights.status_code == 201, weights.text
    program = upload(client, headers, torchscript_bytes(ColourOnly()), "torchscript")
    spec = {"preset": "paper_cmnist_erm", "model": {"arch": "resnet18", "width": 8}, "batch_size": 16, "steps": 2}

    def submit(checkpoint_id: str, as_headers=headers, model=None):
        body = {"kind": "train", "spec": {**spec, "model": model or spec["model"], "init_checkpoint_id": checkpoint_id}}
        return client.post("/v1/jobs", json=body, headers=as_headers)

    accepted = submit(weights.json()["id"])
    assert accepted.status_code == 202 and accepted.json()["spec"]["init_checkpoint_id"] == weights.json()["id"]
    for response, said in ((submit(weights.json()["id"], other), "No checkpoint"),
                           (submit(program.json()["id"]), "safetensors"),
                           (submit(weights.json()["id"], model={"arch": "cnn"}), "arch 'resnet18'")):
        assert response.status_code == 422, response.text
        error = response.json()["error"]
        assert error["details"] == {"field": "spec.init_checkpoint_id"} and said in error["message"]
    # a sweep starts every setting from the weights, with the same checks
    for as_headers, status in ((headers, 202), (other, 422)):
        sweep = client.post("/v1/jobs", headers=as_headers, json={"kind": "sweep", "spec": {
            **spec, "init_checkpoint_id": weights.json()["id"], "grid": {"optimizer.lr": [0.1, 0.01]}}})
        assert sweep.status_code == status, sweep.text
    assert sweep.json()["error"]["details"] == {"field": "spec.init_checkpoint_id"}
