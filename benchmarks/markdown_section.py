"""The benchmarks' tables go into BENCHMARKS.md between <!-- bench:NAME:begin/end --> marks."""

from pathlib import Path


def replace_section(path: str | Path, section: str, text: str) -> None:
    doc = Path(path).read_text()
    begin_mark, end_mark = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    begin, end = doc.index(begin_mark) + len(begin_mark), doc.index(end_mark)
    Path(path).write_text(doc[:begin] + "\n" + text + "\n" + doc[end:])
