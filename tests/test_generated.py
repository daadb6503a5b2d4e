"""The committed stubs in client/src/transactions/ are what `make proto` makes from proto/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUF = Path(sys.executable).parent / "buf"
COMMITTED = ROOT / "client" / "src" / "transactions"


def files_under(folder: Path) -> set[Path]:
    return {
        p.relative_to(folder)
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    """`buf generate` (buf.gen.yaml, run by `make proto`) into a temporary folder, and the
    descriptor set `make proto` writes, equal the committed files byte for byte."""
    subprocess.run([str(BUF), "generate", "-o", str(tmp_path)], cwd=ROOT, check=True)
    fresh = tmp_path / "client" / "src" / "transactions"
    subprocess.run(
        [
            str(BUF),
            "build",
            "--as-file-descriptor-set",
            "-o",
            str(fresh / "descriptor_set.binpb"),
        ],
        cwd=ROOT,
        check=True,
    )
    assert files_under(fresh) == files_under(COMMITTED), "run `make proto` and commit the stubs"
    for rel in sorted(files_under(fresh)):
        assert (fresh / rel).read_bytes() == (COMMITTED / rel).read_bytes(), (
            f"client/src/transactions/{rel} is stale: run `make proto` and commit it"
        )
