"""The benchmarks' tables go into BENCHMARKS.md between <!-- bench:NAME:begin/end --> marks."""

import json
from pathlib import Path


def replace_section(path: str | Path, section: str, text: str) -> None:
    doc = Path(path).read_text()
    begin_mark, end_mark = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    begin, end = doc.index(begin_mark) + len(begin_mark), doc.index(end_mark)
    Path(path).write_text(doc[:begin] + "\n" + text + "\n" + doc[end:])


def report(files: list[str], table, write: str | None, section: str) -> None:
    """Prints ``table`` of the results in ``files`` (JSON lists) and, with ``write``,
    puts it into that Markdown file's ``section``."""
    text = table([r for path in files for r in json.loads(Path(path).read_text())])
    print(text)
    if write:
        replace_section(write, section, text)


def add_report_command(sub, section: str) -> None:
    """The benchmarks' `report` subcommand: files, --write, --section (default ``section``)."""
    p = sub.add_parser("report")
    p.add_argument("files", nargs="+")
    p.add_argument("--write", help="replace the marked section of this Markdown file")
    p.add_argument("--section", default=section, help="its marker: <!-- bench:SECTION:begin -->")
