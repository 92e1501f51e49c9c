"""Small shared utilities: atomic file writes, run directories, seeding, devices."""

from advreid.utils.io import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    paths_overlap,
    prepare_run_dir,
    sha256_file,
)
from advreid.utils.misc import get_device, jsonable, seed_everything

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "append_jsonl",
    "prepare_run_dir",
    "paths_overlap",
    "sha256_file",
    "jsonable",
    "seed_everything",
    "get_device",
]
