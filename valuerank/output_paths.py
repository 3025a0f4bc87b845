"""Refuse output folders that would destroy an input or someone else's files.

The Spark jobs write with overwrite mode, which deletes the output folder first, and the
trainer replaces its own earlier outputs. Both call ``check_output_path`` before any work.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


class OutputPathError(ValueError):
    """Unsafe output path: it overlaps an input, or it is a non-empty folder that an earlier run of the same job did not write."""


def check_output_path(job: str, out: Path, inputs: dict[str, Path], manifest_name: str) -> Path:
    """Raise OutputPathError unless ``job`` may write to folder ``out``; return the resolved path.

    The output must not equal, lie inside or contain any of ``inputs`` (role: path),
    compared after resolving symbolic links and ``..``. An existing folder must be empty,
    or hold a ``manifest_name`` JSON file whose ``job`` field is ``job``.
    """
    out = out.resolve()
    for role, path in inputs.items():
        source = path.resolve()
        relation = None
        if out == source:
            relation = "is the same path as"
        elif source in out.parents:
            relation = "is inside"
        elif out in source.parents:
            relation = "contains"
        if relation is not None:
            raise OutputPathError(
                f"output {out} {relation} the {role} input {source}; writing there would delete the input or "
                "mix the output into it. Choose an output folder outside the inputs"
            )

    if not out.exists():
        return out
    if not out.is_dir():
        raise OutputPathError(f"output {out} is a file, which the {job} job would delete; choose an empty or new folder")
    if not any(out.iterdir()):
        return out

    owner = _manifest_job(out / manifest_name)
    if owner == job:
        logger.info("replacing the earlier %s output in %s", job, out)
        return out
    found = "it has no valuerank manifest" if owner is None else f"its manifest names job {owner!r}"
    raise OutputPathError(
        f"output folder {out} is not empty and is not an earlier {job} output ({found}), and the job would "
        "delete its contents; choose an empty or new folder, or delete this one"
    )


def _manifest_job(path: Path) -> str | None:
    """Return the ``job`` field of the manifest at ``path``, or None when it is missing or unreadable."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    job = manifest.get("job") if isinstance(manifest, dict) else None
    return job if isinstance(job, str) else None
