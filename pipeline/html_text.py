"""Readable text out of an HTML page, with the standard library's parser only.

Pages are untrusted input, so no parser that fetches, executes or resolves anything:
``html.parser`` tokenises, and this keeps the text a reader sees, laid out in paragraphs.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_SKIP_TAGS = frozenset({"script", "style", "noscript", "template", "svg"})
_HEAD_TAGS = frozenset({"title", "meta", "link", "base", "style", "script", "noscript", "template"})
_LINE_TAGS = frozenset({"br", "li", "tr", "dt", "dd", "option"})
_CELL_TAGS = frozenset({"td", "th"})
_BLOCK_TAGS = frozenset(
    {
        "address",
        "article",
        "aside",
        "blockquote",
        "body",
        "caption",
        "center",
        "details",
        "dialog",
        "dir",
        "div",
        "dl",
        "fieldset",
        "figcaption",
        "figure",
        "footer",
        "form",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "header",
        "hgroup",
        "hr",
        "html",
        "legend",
        "main",
        "menu",
        "nav",
        "ol",
        "p",
        "pre",
        "section",
        "summary",
        "table",
        "tbody",
        "tfoot",
        "thead",
        "title",
        "ul",
    }
)
# HTML's own whitespace: a no-break space is content, not layout.
_HTML_SPACE = re.compile(r"[ \t\n\r\f]+")


class _TextExtractor(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self.lines: list[str] = []
        self.parts: list[str] = []
        self.line_pre = False
        self.skip = 0
        self.pre = 0
        self.in_head = False
        self.in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self.skip += 1
            return
        if self.skip:
            return
        if tag == "head":
            self.in_head = True
        elif self.in_head and tag not in _HEAD_TAGS:
            self.in_head = False  # the body started without a <body> tag
        if tag == "title":
            self.in_title = True
        self._boundary(tag)
        if tag == "pre":
            self.pre += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip = max(0, self.skip - 1)
            return
        if self.skip:
            return
        if tag == "head":
            self.in_head = False
        elif tag == "title":
            self.in_title = False
        self._boundary(tag)
        if tag == "pre":
            self.pre = max(0, self.pre - 1)

    def handle_data(self, data: str) -> None:
        if self.skip or (self.in_head and not self.in_title):
            return
        if not self.pre:
            self.parts.append(data)
            return
        first, *rest = data.split("\n")
        self.parts.append(first)
        self.line_pre = True
        for piece in rest:
            self._end_line()
            self.parts.append(piece)
            self.line_pre = True

    def text(self) -> str:
        self._end_paragraph()
        return "\n\n".join(self.paragraphs)

    def _boundary(self, tag: str) -> None:
        if tag in _BLOCK_TAGS:
            self._end_paragraph()
        elif tag in _LINE_TAGS:
            self._end_line()
        elif tag in _CELL_TAGS:
            self.parts.append(" ")

    def _end_line(self) -> None:
        line = "".join(self.parts)
        self.parts.clear()
        if self.line_pre:
            self.lines.append(line.rstrip())  # code keeps its indentation and blank lines
        else:
            line = _HTML_SPACE.sub(" ", line).strip(" ")
            if line:
                self.lines.append(line)
        self.line_pre = False

    def _end_paragraph(self) -> None:
        self._end_line()
        while self.lines and not self.lines[-1]:
            self.lines.pop()
        while self.lines and not self.lines[0]:
            self.lines.pop(0)
        if self.lines:
            self.paragraphs.append("\n".join(self.lines))
        self.lines.clear()


def html_to_text(page: str) -> str:
    """The readable text of an HTML page: paragraphs separated by a blank line.

    Script, style, noscript, template and svg content is dropped, and so is the head except
    its ``<title>``; block-level tags end a paragraph, ``<br>`` and list items end a line;
    whitespace inside a line is collapsed except in ``<pre>``; entities are unescaped.
    """
    parser = _TextExtractor()
    parser.feed(page)
    parser.close()
    return parser.text()
