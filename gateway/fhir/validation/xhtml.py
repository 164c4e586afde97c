"""Narrative safety: the invariants txt-1 and txt-2 on ``Narrative.div``.

Spec: https://hl7.org/fhir/R4/narrative.html#xhtml -- the div is XHTML in the
``http://www.w3.org/1999/xhtml`` namespace holding only basic formatting
elements and attributes: no scripts, forms, frames, objects, event handler
attributes, base/link/style elements, external entities or DTDs (txt-1), and
some non-whitespace content (txt-2).

Receivers render narrative in browsers, so this check is written against
attacks, not only against the letter of the spec:

* the parser is lxml's with ``resolve_entities=False, no_network=True,
  load_dtd=False, huge_tree=False``; a DOCTYPE, an entity declaration, a
  processing instruction or a CDATA section is refused before parsing (an
  undeclared entity such as ``&colon;`` is then an XML error, so refused too);
* elements and attributes are allow-listed (the list the HL7 validator uses);
* URL attributes are decoded by the XML parser (character references), then
  stripped of whitespace, control and format characters and lower-cased, so
  ``jav&#x09;ascript:``, ``JaVaScRiPt:`` or `` \\u200bjavascript:`` all read
  ``javascript:``; only ``http``, ``https``, ``mailto``, ``tel``, ``urn`` and
  ``ftp`` schemes (or no scheme: relative references and ``#fragments``) pass,
  and on ``<img src>`` also ``data:image/…`` (an image inlined: what the HL7
  validator accepts and the IG Publisher writes; a browser runs no script in
  an image);
* ``style`` values are CSS-unescaped and stripped of comments before looking
  for ``expression(``, ``@import``, ``behavior``, ``-moz-binding`` and script
  schemes; ``url(…)`` may name a relative reference or a ``data:image/…``
  (the IG Publisher's tree tables draw their lines with
  ``background-image: url(tbl_bck1.png)``), nothing that leaves the page's
  own site;
* comments holding markup (``<``/``>``, IE conditional comments) are refused,
  since a browser's HTML parser may end a comment where XML would not.
"""

from __future__ import annotations

import re
import threading
import unicodedata

from lxml import etree  # type: ignore[import-untyped]

XHTML_NS = "http://www.w3.org/1999/xhtml"
XML_NS = "http://www.w3.org/XML/1998/namespace"
_X = "{" + XHTML_NS + "}"

ELEMENTS = frozenset((
    "p", "br", "div", "h1", "h2", "h3", "h4", "h5", "h6", "a", "span", "b", "em", "i",
    "strong", "small", "big", "tt", "dfn", "q", "var", "abbr", "acronym", "cite",
    "blockquote", "hr", "address", "bdo", "kbd", "sub", "sup", "ul", "ol", "li", "dl", "dt",
    "dd", "pre", "table", "caption", "colgroup", "col", "thead", "tr", "tfoot", "tbody", "th",
    "td", "code", "samp", "img", "map", "area",
))
GLOBAL_ATTRIBUTES = frozenset((
    "title", "style", "class", "id", "lang", "dir", "accesskey", "tabindex",
    # table cells and columns
    "span", "width", "align", "valign", "char", "charoff", "abbr", "axis", "headers",
    "scope", "rowspan", "colspan",
))
ELEMENT_ATTRIBUTES = frozenset((
    "a.href", "a.name", "a.charset", "a.type", "a.hreflang", "a.rel", "a.rev", "a.shape",
    "a.coords", "img.src", "img.alt", "img.longdesc", "img.height", "img.width",
    "img.usemap", "img.ismap", "img.border", "blockquote.cite", "q.cite", "map.name",
    "area.shape", "area.coords", "area.href", "area.nohref", "area.alt", "table.summary",
    "table.width", "table.border", "table.frame", "table.rules", "table.cellspacing",
    "table.cellpadding",
))
XML_ATTRIBUTES = frozenset(("{" + XML_NS + "}lang", "{" + XML_NS + "}space"))
URL_ATTRIBUTES = frozenset(("href", "src", "cite", "longdesc", "usemap"))
SAFE_SCHEMES = frozenset(("http", "https", "mailto", "tel", "urn", "ftp"))

_SCHEME = re.compile(r"([a-z][a-z0-9+.\-]*):")
_REFUSED_MARKUP = re.compile(r"<!DOCTYPE|<!ENTITY|<\?|<!\[CDATA\[", re.IGNORECASE)
_CSS_ESCAPE = re.compile(r"\\([0-9a-fA-F]{1,6})\s?|\\(.)", re.DOTALL)
_CSS_COMMENT = re.compile(r"/\*.*?(\*/|$)", re.DOTALL)
_CSS_BAD = ("expression(", "@import", "behavior", "-moz-binding", "javascript:",
            "vbscript:", "data:", "image(", "image-set(")
#: ``url(…)`` in a squashed style value (no whitespace left): quoted or bare argument
_CSS_URL = re.compile(r"""url\(("[^"]*"|'[^']*'|[^)]*)\)?""")

_local = threading.local()


def hardened_parser() -> etree.XMLParser:
    """lxml's parser as every XML input of the gateway uses it: entities unresolved,
    no DTD, no network, no huge trees (one per thread)."""
    parser = getattr(_local, "parser", None)
    if parser is None:
        parser = _local.parser = etree.XMLParser(
            resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
            dtd_validation=False, remove_blank_text=False, collect_ids=False,
        )
    return parser


def has_dtd(root: etree._Element) -> bool:
    """A parsed document declares a DOCTYPE (with entities or not): refused everywhere,
    also when a scan of its bytes could not see it (UTF-16)."""
    info = root.getroottree().docinfo
    return bool(info.doctype) or info.internalDTD is not None or info.externalDTD is not None


_ASCII_IGNORED = {i: None for i in range(0x21)} | {0x7F: None}


def _squash(value: str) -> str:
    """Drop what browsers ignore inside a URL scheme, then lower-case."""
    if value.isascii():
        return value.translate(_ASCII_IGNORED).lower()
    return "".join(
        ch for ch in value
        if not (ch.isspace() or ord(ch) < 0x20 or unicodedata.category(ch) in ("Cc", "Cf"))
    ).lower()


def unsafe_url(value: str, *, image: bool = False) -> bool:
    """Whether a URL attribute may not stand in narrative; ``image``: it names an
    image to show (``<img src>``), which may be inlined as ``data:image/…``."""
    squashed = _squash(value)
    m = _SCHEME.match(squashed)
    if m is None:
        return False
    scheme = m.group(1)
    if scheme == "data":
        return not (image and squashed.startswith("data:image/"))
    return scheme not in SAFE_SCHEMES


def _unsafe_css_url(argument: str) -> bool:
    """A ``url(…)`` argument (CSS escapes decoded, squashed) is safe if it stays on the
    page's site: a relative reference (not ``//host/…``) or an inlined image.

    A backslash left after CSS decoding (``\\\\/host`` in the style) is a slash to the
    URL parser (https://url.spec.whatwg.org/#relative-slash-state: in a special scheme
    such as the page's http(s), ``\\`` is read as ``/``), so ``\\/host``, ``/\\host``
    and ``\\\\host`` all name another host."""
    url = argument
    if url[:1] in ("'", '"'):
        url = url[1:-1] if len(url) > 1 and url[-1] == url[0] else url[1:]
    if url.replace("\\", "/").startswith("//"):
        return True
    return _SCHEME.match(url) is not None and not url.startswith("data:image/")


def _css_unescape(value: str) -> str:
    def repl(m: re.Match[str]) -> str:
        if m.group(1):
            code = int(m.group(1), 16)
            return chr(code) if 0 < code < 0x110000 else ""
        return m.group(2)

    return _CSS_ESCAPE.sub(repl, value)


def unsafe_style(value: str) -> str | None:
    if "\\" in value:
        value = _css_unescape(value)
    if "/*" in value:
        value = _CSS_COMMENT.sub("", value)
    text = _squash(value)
    if "url(" in text:
        for m in _CSS_URL.finditer(text):
            if _unsafe_css_url(m.group(1)):
                return "url("
        text = _CSS_URL.sub("", text)
    for bad in _CSS_BAD:
        if bad in text:
            return bad
    return None


_ALLOWED_TAGS = frozenset(_X + name for name in ELEMENTS)
_IMG = _X + "img"
#: attributes whose value needs no look
_PLAIN = GLOBAL_ATTRIBUTES - {"style"}


#: the most attributes an element of narrative may have (HTML's need a few)
MAX_ATTRIBUTES = 32


def check_narrative(div: str) -> list[tuple[str, str]]:
    """Problems with a ``Narrative.div`` as ``(constraint key, message)`` pairs."""
    bad = _REFUSED_MARKUP.search(div)
    if bad:
        return [("txt-1", f"the narrative may not contain '{bad.group()}'")]
    try:
        root = etree.fromstring(div.encode("utf-8"), hardened_parser())
    except (etree.XMLSyntaxError, ValueError) as exc:
        return [("txt-1", f"the narrative is not well-formed XHTML: {str(exc)[:120]}")]
    if has_dtd(root):
        return [("txt-1", "the narrative may not have a DOCTYPE")]
    problems: list[tuple[str, str]] = []
    if root.tag != _X + "div":
        problems.append(("txt-1", "the narrative must be a <div> in the XHTML namespace "
                                  f"({XHTML_NS})"))
    allowed, plain = _ALLOWED_TAGS, _PLAIN
    has_image = False
    for node in root.iter():
        tag = node.tag
        if tag.__class__ is not str:  # comment or processing instruction
            if isinstance(node, etree._Comment):
                text = node.text or ""
                if "<" in text or ">" in text or text.lstrip().startswith("["):
                    problems.append(("txt-1", "the narrative has a comment holding markup"))
            else:
                problems.append(("txt-1", "the narrative may not hold processing instructions"))
            continue
        if tag not in allowed:
            problems.append(("txt-1", f"element <{tag[len(_X):]}> is not allowed in narrative"
                             if tag.startswith(_X) else f"element '{tag}' is not XHTML"))
        elif tag == _IMG:
            has_image = True
        if len(node.attrib) > MAX_ATTRIBUTES:
            # (lxml reads attributes in time that grows with the square of their number)
            problems.append(("txt-1", f"an element has more than {MAX_ATTRIBUTES} attributes"))
            continue
        items = node.items()
        if items:
            for attr, value in items:
                if attr in plain:
                    continue
                problem = _attribute_problem(tag[len(_X):] if tag.startswith(_X) else tag,
                                             attr, value)
                if problem:
                    problems.append(("txt-1", problem))
    text = etree.tostring(root, method="text", encoding="unicode")
    if not has_image and (not text or text.isspace()):
        problems.append(("txt-2", "the narrative has no non-whitespace content"))
    return problems


def _attribute_problem(element: str, attr: str, value: str) -> str | None:
    if attr.startswith("{"):
        if attr in XML_ATTRIBUTES:
            return None
        return f"attribute '{attr}' on <{element}> is not allowed in narrative"
    lower = attr.lower()
    if lower.startswith("on"):
        return f"event handler attribute '{attr}' on <{element}> is not allowed"
    if attr not in GLOBAL_ATTRIBUTES and f"{element}.{attr}" not in ELEMENT_ATTRIBUTES:
        return f"attribute '{attr}' on <{element}> is not allowed in narrative"
    if attr in URL_ATTRIBUTES and unsafe_url(value, image=element == "img" and attr == "src"):
        return f"attribute '{attr}' on <{element}> holds an unsafe URL scheme"
    if attr == "style":
        found = unsafe_style(value)
        if found:
            return f"style on <{element}> holds '{found}'"
    return None
