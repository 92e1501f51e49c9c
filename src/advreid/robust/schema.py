"""The results file's JSON Schema (``schemas/results-v1.json``, shipped as package data) and its validation.

``FORMAT`` names the version in every file; a change that breaks readers adds ``results-v2.json`` beside it.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

__all__ = ["FILE_KINDS", "FORMAT", "SCHEMA_FILE", "results_schema", "validate_file", "validate_results"]

FORMAT = "advreid.robust.v1"
SCHEMA_FILE = "results-v1.json"
FILE_KINDS = {"results": None, "member": "member_file", "job": "job_file"}  # file -> its definition in the schema


@cache
def _schema_text() -> str:
    return resources.files("advreid.robust").joinpath("schemas", SCHEMA_FILE).read_text(encoding="utf-8")


def results_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``advreid robust``'s ``results.json`` (a fresh copy)."""
    return json.loads(_schema_text())


def validate_results(doc: Any) -> None:
    """Raise ValueError naming the first violation when ``doc`` is not a valid results file; a no-op where the
    ``jsonschema`` package is not installed (it is a dev dependency; the tests always validate)."""
    validate_file(doc, "results")


def validate_file(doc: Any, kind: str = "results") -> None:
    """Validate one file ``advreid robust`` writes: ``results`` (results.json), ``member`` (members/<name>.json) or
    ``job`` (job.json), against the schema (the latter two are its ``$defs``)."""
    if kind not in FILE_KINDS:
        raise ValueError(f"kind={kind!r}; expected one of {', '.join(FILE_KINDS)}")
    try:
        import jsonschema
    except ImportError:  # pragma: no cover - the package is optional at run time
        return
    schema = results_schema()
    if FILE_KINDS[kind] is not None:
        schema = {**schema, "$ref": f"#/$defs/{FILE_KINDS[kind]}"}
        for key in ("required", "properties", "type", "title", "description"):
            schema.pop(key, None)
    validator = jsonschema.Draft202012Validator(schema)
    err = next(iter(sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))), None)
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise ValueError(f"{kind} file does not follow {SCHEMA_FILE} at {where}: {err.message}")
