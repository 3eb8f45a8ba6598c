"""A report table and its three renderings: Markdown, CSV and a plain LaTeX ``tabular``."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Table:
    """A text table rendered as Markdown or a plain LaTeX ``tabular`` (no extra packages)."""

    title: str
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)
    """(row, column) entries to set in bold."""

    def markdown(self) -> str:
        def text(i: int, j: int, value: str) -> str:
            return f"**{value}**" if (i, j) in self.bold else value

        lines = [
            self.title,
            "",
            "| " + " | ".join(self.header) + " |",
            "| " + " | ".join(["---"] + ["---:"] * (len(self.header) - 1)) + " |",
        ]
        for i, row in enumerate(self.rows):
            lines.append("| " + " | ".join(text(i, j, v) for j, v in enumerate(row)) + " |")
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        def text(i: int, j: int, value: str) -> str:
            value = latex_escape(value)
            return f"\\textbf{{{value}}}" if (i, j) in self.bold else value

        lines = [
            *(f"% {line}" for line in self.title.splitlines() if line.strip()),
            "\\begin{tabular}{l" + "r" * (len(self.header) - 1) + "}",
            "\\hline",
            " & ".join(latex_escape(h) for h in self.header) + " \\\\",
            "\\hline",
        ]
        for i, row in enumerate(self.rows):
            lines.append(" & ".join(text(i, j, v) for j, v in enumerate(row)) + " \\\\")
        lines += ["\\hline", "\\end{tabular}"]
        return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    """Escape LaTeX specials; ± and – become ``$\\pm$`` and ``--``."""
    out = []
    for char in text:
        if char in "&%$#_{}":
            out.append("\\" + char)
        elif char == "\\":
            out.append("\\textbackslash{}")
        elif char in "~^":
            out.append(f"\\{'textasciitilde' if char == '~' else 'textasciicircum'}{{}}")
        else:
            out.append({"±": "$\\pm$", "–": "--"}.get(char, char))
    return "".join(out)


def write_table(table: Table, csv_rows: list[dict], stem: Path) -> None:
    """Write ``stem.md``, ``stem.tex`` and ``stem.csv`` (``csv_rows``; the header if none)."""
    # Not with_suffix: names such as results_dir0.1 already hold a dot.
    stem.parent.joinpath(f"{stem.name}.md").write_text(table.markdown())
    stem.parent.joinpath(f"{stem.name}.tex").write_text(table.latex())
    with stem.parent.joinpath(f"{stem.name}.csv").open("w", newline="") as f:
        fields = list(csv_rows[0]) if csv_rows else table.header
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(csv_rows)
