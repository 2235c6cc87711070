"""Hostile uploads over HTTP: refused with a 4xx that carries nothing from outside the upload."""
from __future__ import annotations

import threading

import pytest

from api.errors import ApiError
from api.sandbox import CheckGate
from tests.fixtures_models import ColourOnly, ReadsAFile, onnx_reading_a_file, torchscript_bytes


def upload(client, headers, content: bytes, fmt: str, name: str = "model.pt", **fields):
    return client.post(
        "/v1/checkpoints", files={"file": (name, content)}, data={"format": fmt, **fields}, headers=headers
    )


@pytest.fixture
def settings():
    from core.settings import get_settings

    return get_settings()


def test_a_torchscript_model_reading_the_admin_token_is_refused(client, tenant, settings):
    from api.deps import admin_token

    token = admin_token().encode()
    target = settings.var_dir / "leak-target"
    target.write_bytes(token)
    response = upload(client, tenant(), torchscript_bytes(ReadsAFile(str(target.resolve()))), "torchscript")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "forbidden_op"
    numbers = ", ".join(str(b) for b in token[:4])
    assert token[:4].decode() not in response.text and numbers not in response.text


def test_an_onnx_model_pointing_at_another_tenants_checkpoint_gets_nothing(client, tenant, settings):
    victim = upload(client, tenant("victim"), torchscript_bytes(ColourOnly()), "torchscript")
    assert victim.status_code == 201, victim.text
    stored = next((settings.storage_dir / "checkpoints").glob(f"{victim.json()['id']}*")).resolve()
    response = upload(client, tenant("attacker"), onnx_reading_a_file(str(stored)), "onnx", name="m.onnx")
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "bad_format"
    assert str(stored) not in response.text and str(settings.storage_dir) not in response.text


def test_checks_past_the_per_key_and_queue_limits_are_429(settings, monkeypatch):
    monkeypatch.setattr(settings, "upload_check_slots", 1)
    monkeypatch.setattr(settings, "upload_check_queue", 1)
    monkeypatch.setattr(settings, "upload_checks_per_key", 1)
    gate, running, release = CheckGate(), threading.Event(), threading.Event()

    def hold(owner: str) -> None:
        with gate.enter(owner, settings):
            running.set()
            release.wait(10)

    first = threading.Thread(target=hold, args=("a",))
    first.start()
    assert running.wait(5)
    with pytest.raises(ApiError) as same_key:
        with gate.enter("a", settings):
            pass
    assert same_key.value.status == 429 and same_key.value.headers == {"Retry-After": "5"}
    second = threading.Thread(target=hold, args=("b",))  # waits: the one slot is taken
    second.start()
    with pytest.raises(ApiError) as full:
        with gate.enter("c", settings):
            pass
    assert full.value.status == 429
    release.set()
    first.join(5)
    second.join(5)
    with gate.enter("c", settings):  # all freed
        pass


def test_safetensors_with_a_huge_architecture_is_refused_before_it_is_built(client, tenant):
    from safetensors.torch import save

    import torch

    content = save({"w": torch.zeros(1)})  # ~100 bytes that would build a 1.3M-wide network
    response = upload(client, tenant(), content, "safetensors", name="m.safetensors", arch="mlp",
                      arch_params='{"hidden": [1300000]}')
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"]["field"].startswith("arch_params.hidden")
