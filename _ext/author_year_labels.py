"""Author-year labels in the bibliography, as the chapters cite: "[Madry et al., 2018]".

The book cites with sphinxcontrib-bibtex's ``author_year`` reference style, but the bibliography
page labels its entries with the formatting style's labels, by default pybtex's ``alpha``
("[MMS+18]"), so a reader who follows a citation lands on a key that looks like another. This
local Sphinx extension registers a pybtex formatting style (``unsrt``'s entries, sorted by author
and year) whose labels are the citations' own text: the first author's last name, "and" the
second's when there are two, "et al." when there are more, then the year; a letter tells apart
two entries that would share a label ("Madry et al., 2018a").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator

from pybtex.plugin import register_plugin
from pybtex.richtext import Text
from pybtex.style.formatting.unsrt import Style as UnsrtStyle
from pybtex.style.labels import BaseLabelStyle

NAME = "author_year_labels"


def _last_name(person) -> str:
    """A person's last name as plain text (LaTeX accents and braces resolved)."""
    return Text.from_latex(" ".join(person.prelast_names + person.last_names)).render_as("text")


def author_year(entry) -> str:
    """``"Madry et al., 2018"``, ``"Carlini and Wagner, 2017"`` or ``"Krizhevsky, 2009"``."""
    people = entry.persons.get("author") or entry.persons.get("editor") or []
    names = [_last_name(p) for p in people]
    if not names:
        who = entry.fields.get("title", entry.key)
    elif len(names) == 1:
        who = names[0]
    elif len(names) == 2:
        who = f"{names[0]} and {names[1]}"
    else:
        who = f"{names[0]} et al."
    return f"{who}, {entry.fields.get('year', 'n.d.')}"


class AuthorYearLabels(BaseLabelStyle):
    def format_labels(self, sorted_entries: Iterable) -> Iterator[str]:
        entries = list(sorted_entries)
        labels = [author_year(e) for e in entries]
        counts, seen = Counter(labels), Counter()
        for label in labels:
            if counts[label] > 1:
                seen[label] += 1
                label += "abcdefghijklmnopqrstuvwxyz"[seen[label] - 1]
            yield label


class Style(UnsrtStyle):
    default_label_style = NAME
    default_sorting_style = "author_year_title"


def setup(app) -> dict[str, bool]:
    register_plugin("pybtex.style.labels", NAME, AuthorYearLabels)
    register_plugin("pybtex.style.formatting", NAME, Style)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
