"""The benchmark scripts' doc writer and commit label (mamba3_jax.benchmark)."""

from mamba3_jax import benchmark
from mamba3_jax.benchmark import GENERATED_BEGIN, GENERATED_END, replace_doc_section

DOC = f"""# Benchmarks

## Table A

Hand-written prose before.

{GENERATED_BEGIN}
old run
{GENERATED_END}

Prose after.

## Table B

B's text.
"""


def test_only_the_generated_block_is_replaced(tmp_path):
    path = tmp_path / "b.md"
    path.write_text(DOC)
    replace_doc_section("## Table A", "new run\n| a |", path, preamble="ignored here")
    text = path.read_text()
    assert "old run" not in text and "new run\n| a |" in text
    assert "Hand-written prose before." in text and "Prose after." in text
    assert "ignored here" not in text and text.endswith("## Table B\n\nB's text.\n")


def test_section_without_markers_or_absent(tmp_path):
    path = tmp_path / "b.md"
    path.write_text(DOC)
    replace_doc_section("## Table B", "run B", path, preamble="What B is.")
    text = path.read_text()
    assert "B's text." not in text
    assert text.endswith(f"## Table B\n\nWhat B is.\n\n{GENERATED_BEGIN}\nrun B\n{GENERATED_END}\n")
    replace_doc_section("## Table C", "run C", path)
    assert path.read_text().endswith(f"## Table C\n\n{GENERATED_BEGIN}\nrun C\n{GENERATED_END}\n")
    replace_doc_section("## Table B", "run B2", path)  # now with markers: B's preamble stays
    text = path.read_text()
    assert "What B is." in text and "run B2" in text and "run B\n" not in text
    assert "Hand-written prose before." in text and "## Table C" in text


def test_commit_label_from_the_environment(monkeypatch):
    monkeypatch.setenv("MAMBA3_COMMIT", "abc1234")
    assert benchmark.git_commit() == "abc1234"
    monkeypatch.delenv("MAMBA3_COMMIT")
    assert benchmark.git_commit() != "abc1234"
