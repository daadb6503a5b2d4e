"""The committed stubs in generated/ are what `make proto` makes from proto/ today."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "scripts" / "gen_proto.py")
    assert spec is not None
    assert spec.loader is not None
    gen_proto = importlib.util.module_from_spec(spec)
    sys.modules["gen_proto"] = gen_proto
    spec.loader.exec_module(gen_proto)

    written = gen_proto.generate(tmp_path)
    assert written
    committed = ROOT / "generated"
    fresh_files = {p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()}
    committed_files = {
        p.relative_to(committed)
        for p in committed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert fresh_files == committed_files, "run `make proto` and commit generated/"
    for rel in sorted(fresh_files):
        assert (tmp_path / rel).read_bytes() == (committed / rel).read_bytes(), (
            f"generated/{rel} is stale: run `make proto` and commit it"
        )
