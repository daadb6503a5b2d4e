"""`buf breaking`: does proto/ break a consumer of the main branch's proto? Run by `make lint`.

The main branch's proto/ (and buf.yaml) are taken out of git into a temporary folder and compared
with the working tree's under buf.yaml's `breaking` rules (FILE: wire and generated-code
compatibility). Reading them with `git archive` rather than buf's own git input works in a
worktree and in a fresh clone alike.

Where there is nothing to compare with, this is a no-op, not a failure, and it says so: outside a
git checkout (a source archive, a container build), or in a clone with neither a `main` nor an
`origin/main` branch. On the main branch itself it compares main with itself (nothing to find).

One transition is let through: while main's proto sets no per-language file options at all
(`go_package`, `java_package`, ...), setting them for the first time is not reported (buf counts
"unset" to "set" as a change of package). No code in those languages can exist yet, so nothing
breaks; once main has them, every later change of them is checked like everything else.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUF = Path(sys.executable).parent / "buf"
# The FILE rules about the per-language file options that proto/ sets.
FILE_OPTION_RULES = [
    "FILE_SAME_CSHARP_NAMESPACE",
    "FILE_SAME_GO_PACKAGE",
    "FILE_SAME_JAVA_MULTIPLE_FILES",
    "FILE_SAME_JAVA_OUTER_CLASSNAME",
    "FILE_SAME_JAVA_PACKAGE",
    "FILE_SAME_OBJC_CLASS_PREFIX",
    "FILE_SAME_PHP_NAMESPACE",
    "FILE_SAME_RUBY_PACKAGE",
]


def _git(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=False)


def main_ref() -> str | None:
    """The main branch's ref, if this is a git checkout that has one."""
    for ref in ("main", "origin/main"):
        if _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").returncode == 0:
            return ref
    return None


def main() -> int:
    ref = main_ref()
    if ref is None:
        print("buf breaking: skipped, no main branch to compare proto/ with")
        return 0
    archive = _git("archive", "--format=tar", ref, "buf.yaml", "proto")
    if archive.returncode != 0:
        print(f"buf breaking: skipped, {ref} has no proto/ to compare with")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(tmp, filter="data")
        args = [str(BUF), "breaking", "--against", tmp]
        if not any("option go_package" in p.read_text() for p in Path(tmp).rglob("*.proto")):
            print(f"buf breaking: {ref}'s proto sets no file options yet; not checking them")
            config = {
                "version": "v2",
                "modules": [{"path": "proto"}],
                "breaking": {"use": ["FILE"], "except": FILE_OPTION_RULES},
            }
            args += ["--config", json.dumps(config)]
        result = subprocess.run(args, cwd=ROOT, check=False)
    if result.returncode != 0:
        print(
            f"buf breaking: proto/ breaks consumers of {ref}'s proto (see above)", file=sys.stderr
        )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
