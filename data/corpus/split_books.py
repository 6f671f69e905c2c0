"""Rebuild this corpus from the Project Gutenberg plain-text files listed in README.md: drop Project Gutenberg's
header and footer (everything up to its `*** START OF ...` line and from its `*** END OF ...` line, with the
"End of the Project Gutenberg EBook" line), the title page and the table of contents, and write one UTF-8 file per
chapter, `<book>/<NN>.txt` (LF line ends, no BOM, leading and trailing whitespace removed).

    python data/corpus/split_books.py SOURCE_DIR [OUT_DIR]      # SOURCE_DIR holds 11-0.txt, pg1342.txt, ...
"""

from __future__ import annotations

import itertools
import re
import sys
from pathlib import Path

# book directory -> (source file, the chapter heading lines of its body)
BOOKS = {
    "alice_in_wonderland": ("11-0.txt", r"CHAPTER [IVXL]+\. .*"),
    "treasure_island": ("120-0.txt", r"\d+"),
    "pride_and_prejudice": ("pg1342.txt", r"Chapter I\.\]|(?:CHAPTER|Chapter) [IVXL]+\.?"),
    "adventures_of_sherlock_holmes": ("pg1661.txt", r"[IVX]+\. [A-Z][A-Z ’'-]+"),
    "a_study_in_scarlet": ("244-0.txt", r"CHAPTER [IVX]+\. .*"),
    "the_time_machine": ("35-0.txt", r" ?[IVXL]+"),
    "the_war_of_the_worlds": ("36-0.txt", r"[IVX]+\."),
    "jekyll_and_hyde": ("43-0.txt", r"[A-Z][A-Z .’'-]{8,}"),
    "a_christmas_carol": ("46-0.txt", r"STAVE [IVX]+: .*"),
    "tom_sawyer": ("74-0.txt", r"CHAPTER [IVXL]+"),
}
MIN_CHAPTER_CHARS = 1500  # a heading followed by less text is a table-of-contents entry (or a signature line)


def body(text: str) -> str:
    """The book without Project Gutenberg's header and footer."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.MULTILINE)
    end = re.search(r"^ *\*\*\* ?END OF.*$", text, re.MULTILINE)
    text = text[start.end() : end.start()]
    return re.sub(r"\n *End of (the )?Project Gutenberg.*\n*$", "\n", text, flags=re.IGNORECASE | re.DOTALL)


def chapters(text: str, heading: str) -> list[str]:
    """The chapters of a book body: split before each heading line followed by at least MIN_CHAPTER_CHARS of text;
    what comes before the first chapter is dropped."""
    starts = [m.start() for m in re.finditer(rf"^(?:{heading})$", text, re.MULTILINE)] + [len(text)]
    kept = [a for a, b in itertools.pairwise(starts) if b - a >= MIN_CHAPTER_CHARS] + [len(text)]
    return [text[a:b].strip() + "\n" for a, b in itertools.pairwise(kept)]


def main(source: Path, out: Path) -> None:
    for book, (file, heading) in BOOKS.items():
        parts = chapters(body((source / file).read_text(encoding="utf-8")), heading)
        (out / book).mkdir(parents=True, exist_ok=True)
        for i, part in enumerate(parts, 1):
            (out / book / f"{i:02d}.txt").write_text(part, encoding="utf-8")
        print(f"{book}: {len(parts)} chapters, {sum(map(len, parts))} characters")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent)
