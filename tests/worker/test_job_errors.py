"""One error hierarchy from the science package to the API: each error says its code, the worker records it from one
`except` (worker/runner.py job_error), the API answers it from one helper (api/errors.py coded_error)."""

from __future__ import annotations

import pytest

from api.errors import coded_error
from jail import JailError
from starvation.checkpoints import CheckpointError
from starvation.datasets import DatasetError
from starvation.errors import CodedError, SpecError
from starvation.params import ParamError
from starvation.repair import NoLinearHead
from worker.runner import job_error

CASES = [
    (SpecError("steps must be positive"), "invalid_spec", "steps must be positive"),
    (ParamError("hidden must be positive", field="model.hidden"), "invalid_spec", "hidden must be positive"),
    (DatasetError("no x array"), "invalid_dataset", "no x array"),
    (DatasetError("over 2,000,000 images", code="too_large"), "too_large", "over 2,000,000 images"),
    (NoLinearHead("its head is tied"), "no_linear_head", "The model cannot be repaired: its head is tied."),
    (CheckpointError("unsafe_pickle", "The checkpoint is a pickle.", detail="GLOBAL os.system"), "unsafe_pickle",
     "The checkpoint is a pickle."),
    (JailError("cpu_limit", "The model used more than its 10 s of CPU time."), "cpu_limit",
     "The model used more than its 10 s of CPU time."),
]


@pytest.mark.parametrize(("error", "code", "message"), CASES, ids=[type(case[0]).__name__ for case in CASES])
def test_each_error_carries_its_code_to_the_job_and_to_the_api(error, code, message):
    assert isinstance(error, CodedError)
    assert job_error(error, ctx=None) == {"code": code, "message": message}  # type: ignore[arg-type]  # not read
    answered = coded_error(error)
    assert (answered.status, answered.code, answered.message) == (422, code, message)


def test_the_api_names_the_field_an_error_names():
    assert coded_error(ParamError("hidden must be positive", field="model.hidden")).details == {
        "field": "spec.model.hidden"}
    assert coded_error(SpecError("bad")).details is None


def test_a_missing_file_says_so_without_the_servers_path():
    missing = FileNotFoundError(2, "No such file or directory", "/var/lib/gs/jobs/abc/data.npz")
    assert job_error(missing, ctx=None) == {  # type: ignore[arg-type]
        "code": "missing_input", "message": "A file this job needs is missing."}
