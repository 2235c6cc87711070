"""The shapes of job results: pydantic models that the API serves and the worker checks a result against before
recording it, one module per kind (`report.py`: the audit report the kinds share). Below both api/ and worker/."""
