"""The benchmarks' tables go into BENCHMARKS.md between <!-- bench:NAME:begin/end --> marks;
the GPU benchmarks share one command line: run (the parent), child (one process), report."""

import argparse
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


def main(doc: str, add_options, child, run, table, section: str) -> None:
    """``run`` and ``child`` take the options ``add_options`` adds to both; ``child``
    returns its result, written as JSON to --out; ``report`` prints ``table``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "child"):
        add_options(sub.add_parser(name))
    add_report_command(sub, section)
    args = parser.parse_args()
    if args.command == "child":
        Path(args.out).write_text(json.dumps(child(args)))
    elif args.command == "run":
        run(args)
    else:
        report(args.files, table, args.write, args.section)
