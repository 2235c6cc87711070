"""POST /v1/jobs's body and the job as GET shows it: unions over the registered kinds (api/kinds), told apart by
`kind`. Built from the registry when this module is first imported (a test registers a kind before that)."""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, Field, TypeAdapter

from api.kinds import KINDS
from api.schemas import JobOutFields

JobCreate: Any = Annotated[Union[tuple(kind.Create for kind in KINDS.values())], Field(discriminator="kind")]  # noqa: UP007
JobOut: Any = Annotated[Union[tuple(kind.Out for kind in KINDS.values())], Field(discriminator="kind")]  # noqa: UP007
job_out_adapter: TypeAdapter[JobOutFields] = TypeAdapter(JobOut)


class JobPage(BaseModel):
    items: list[JobOut]
    next_cursor: str | None
