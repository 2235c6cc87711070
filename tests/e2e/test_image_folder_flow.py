"""An image folder end to end, on the embedded default and on PostgreSQL + Redis: registered at once, checked in the
background, then trained on and audited by workers that stream its images from disk."""
from __future__ import annotations

import io
import shutil
import time

from tests.fixtures_models import torchscript_bytes
from tests.science.test_image_folders import N_TEST, ReadsGreen, coloured_folder


def registered(stack, folder: str, timeout_s: float = 60) -> dict:
    response = stack.client.post("/v1/datasets", data={"name": folder, "format": "image_folder", "folder": folder,
                                                       "image_size": "8"})
    assert response.status_code == 202 and response.json()["status"] == "pending", response.text
    deadline = time.monotonic() + timeout_s
    while (dataset := stack.client.get(f"/v1/datasets/{response.json()['id']}").json())["status"] == "pending":
        assert time.monotonic() < deadline, "the check never ended"
        time.sleep(0.2)
    return dataset


def test_a_folder_is_checked_then_trained_on_and_audited_from_disk(stack):
    root = stack.var_dir / "data" / "coloured"
    if not root.exists():
        coloured_folder(root)
    dataset = registered(stack, "coloured")
    assert dataset["status"] == "ready", dataset["error"]
    assert dataset["description"]["splits"] == {"train": 48, "test": N_TEST} and dataset["description"]["counterfactual"]

    spec = {"dataset": {"name": dataset["id"]}, "model": {"arch": "cnn", "channels": [4, 8]}, "method": {"name": "sd"},
            "steps": 6, "batch_size": 16, "eval_every": 3, "seeds": [0]}
    job = stack.client.post("/v1/jobs", json={"kind": "train", "spec": {**spec, "audit": True}})
    assert job.status_code == 202, job.text
    done = stack.wait_for(job.json()["id"], ("succeeded", "failed"), timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    assert done["result"]["execution"]["used"] == "sequential"
    report = done["result"]["audit"]["reports"][0]
    assert sum(group["n"] for group in report["groups"]) == N_TEST and "counterfactual" in report

    upload = stack.client.post("/v1/checkpoints", data={"format": "torchscript"},
                               files={"file": ("green.pt", io.BytesIO(torchscript_bytes(ReadsGreen())))})
    assert upload.status_code in (200, 201), upload.text
    refused = stack.client.post("/v1/jobs", json={"kind": "repair", "spec": {  # the jail cannot read the folder
        "checkpoint_id": upload.json()["id"], "dataset": {"name": dataset["id"]}, "spurious_attribute": "attribute",
        "method": {"name": "finetune_sd", "batch_size": 8}}})
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "unsupported_format"
    assert "image folder" in refused.json()["error"]["message"]
    audit = stack.client.post("/v1/jobs", json={"kind": "audit", "spec": {
        "checkpoint_id": upload.json()["id"], "dataset": {"name": dataset["id"]}, "spurious_attribute": "attribute"}})
    assert audit.status_code == 202, audit.text
    audited = stack.wait_for(audit.json()["id"], ("succeeded", "failed"), timeout_s=180)
    assert audited["status"] == "succeeded", audited["error"]
    foreign = stack.client.get(f"/v1/jobs/{audited['id']}/report").json()
    assert foreign["counterfactual"]["flip_rate"] == 1.0 and foreign["summary"]["verdict"] == "high"


def test_a_folder_whose_images_vanish_after_the_check_fails_the_job_naming_the_image(stack):
    root = stack.var_dir / "data" / "vanishing"
    shutil.rmtree(root, ignore_errors=True)
    coloured_folder(root)
    dataset = registered(stack, "vanishing")
    assert dataset["status"] == "ready", dataset["error"]
    (root / "img" / "60.png").unlink()  # a test image, read by the audit after training
    spec = {"dataset": {"name": dataset["id"]}, "model": {"arch": "cnn", "channels": [4]}, "steps": 2,
            "batch_size": 8, "eval_every": 2, "seeds": [0]}
    job = stack.client.post("/v1/jobs", json={"kind": "train", "spec": spec})
    done = stack.wait_for(job.json()["id"], ("succeeded", "failed"), timeout_s=180)
    assert done["status"] == "failed" and "img/60.png" in done["error"]["message"], done


def test_a_resnet_starts_from_uploaded_torchvision_weights_and_trains_on_the_folder(embedded_stack):
    stack = embedded_stack  # the folder's flow runs on PostgreSQL + Redis in the tests above
    import json

    from safetensors.torch import save

    from starvation.networks import build_network

    root = stack.var_dir / "data" / "coloured"
    if not root.exists():
        coloured_folder(root)
    dataset = registered(stack, "coloured")
    network = build_network("resnet18", {"width": 8}, (3, 8, 8), 1000)
    torchvision_named = {("fc." + k[5:] if k.startswith("head.") else k[len("features."):]): v
                         for k, v in network.state_dict().items()}
    weights = stack.client.post("/v1/checkpoints", files={"file": ("r18.safetensors", save(torchvision_named))},
                                data={"format": "safetensors", "arch": "resnet18", "arch_params": json.dumps({"width": 8}),
                                      "input_shape": "[3, 8, 8]", "num_classes": "1000"})
    assert weights.status_code in (200, 201), weights.text
    spec = {"dataset": {"name": dataset["id"]}, "model": {"arch": "resnet18", "width": 8}, "steps": 4, "batch_size": 8,
            "eval_every": 4, "seeds": [0], "audit": False, "init_checkpoint_id": weights.json()["id"]}
    job = stack.client.post("/v1/jobs", json={"kind": "train", "spec": spec})
    assert job.status_code == 202, job.text
    done = stack.wait_for(job.json()["id"], ("succeeded", "failed"), timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    init = done["result"]["init"]
    assert {**init, "skipped": sorted(init["skipped"])} == {"names": "torchvision", "loaded": 120, "head": "fresh",
                                                            "skipped": ["fc.bias", "fc.weight"]}
    # a sweep fine-tunes every setting from the same weights (choosing, say, the learning rate of a pretrained net)
    sweep = stack.client.post("/v1/jobs", json={"kind": "sweep", "spec": {**spec, "grid": {"optimizer.lr": [1e-3, 1e-2]}}})
    assert sweep.status_code == 202, sweep.text
    done = stack.wait_for(sweep.json()["id"], ("succeeded", "failed"), timeout_s=180)
    assert done["status"] == "succeeded", done["error"]
    assert len(done["result"]["settings"]) == 2 and done["result"]["init"]["head"] == "fresh"
