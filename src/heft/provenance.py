"""What a run records about its own inputs, so that a comparison can prove what it pairs instead of
trusting the plan: its evaluation examples in order (row hashes) and their set's hash, the commit of
the code that ran, and, for a run branched off a shared prefix, the checkpoint it started from.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from heft.io import read_manifest
from heft.tasks.base import Example

BRANCH_RECORD = "branched_from.json"
"""Written into an arm's run folder when it is branched off a prefix run (`record_branch`)."""


def example_ids(examples: Sequence[Example]) -> list[str]:
    """A hash of each example's row (its raw fields, choices and label), in order: the same question
    has the same id in every run and seed. A row that recurs within the set gets '#<n>' appended, so
    ids are unique within one evaluation set."""
    ids, seen = [], {}
    for example in examples:
        row = json.dumps([example.fields, example.choices, example.label], sort_keys=True, default=str)
        digest = hashlib.sha256(row.encode()).hexdigest()[:16]
        seen[digest] = seen.get(digest, 0) + 1
        ids.append(digest if seen[digest] == 1 else f"{digest}#{seen[digest]}")
    return ids


def eval_set_hash(ids: Sequence[str]) -> str:
    """One hash for the evaluation set, its order included."""
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def source_commit() -> str | None:
    """The git commit of the heft source that runs, '+dirty' when its files differ from it; None
    when heft does not run from a git checkout (an installed wheel)."""
    root = Path(__file__).resolve().parents[2]
    if Path(__file__).resolve().parents[1].name != "src" or not (root / ".git").exists():
        return None

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True
        ).stdout.strip()

    try:
        head = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def checkpoint_hash(run_dir: str | Path) -> str:
    """Hash of a run folder's saved stages (the manifest's file hashes of each stage's weights, and the
    base model's): equal for two folders holding the same model, whatever their step folders' names."""
    manifest = read_manifest(run_dir)
    weights = manifest["weights"] + "/"
    stages = {
        path.removeprefix(weights): digest
        for path, digest in manifest["files"].items()
        if "/" in path.removeprefix(weights)  # <stage>/<file>; the optimizer's files sit beside the stages
    }
    record = {"base_model": manifest["base_model"]["sha256"], "stages": stages}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def branch_record(prefix_dir: Path, prefix: str, stages: int) -> dict[str, Any]:
    """What an arm branched off `prefix_dir` starts from, taken from the prefix run itself: its folder,
    checkpoint hash, device, commit and evaluation set (written into the arm's folder as BRANCH_RECORD)."""
    results = json.loads((prefix_dir / "results.json").read_text())
    return {
        "prefix": prefix,
        "stages": stages,
        "run_dir": str(prefix_dir),
        "checkpoint": checkpoint_hash(prefix_dir),
        "device": results.get("device"),
        "commit": results.get("commit"),
        "eval_set_hash": results.get("eval_set_hash"),
    }


def run_provenance(evaluation: Sequence[Example], run_dir: Path) -> dict[str, Any]:
    """results.json's provenance fields: the evaluation examples' ids in order and their set's hash,
    the code's commit, and the branch record when the run continued a prefix (else None)."""
    ids = example_ids(evaluation)
    branch = run_dir / BRANCH_RECORD
    return {
        "eval_example_ids": ids,
        "eval_set_hash": eval_set_hash(ids),
        "commit": source_commit(),
        "branched_from": json.loads(branch.read_text()) if branch.is_file() else None,
    }
