"""Narrative safety, txt-1 and txt-2 (gateway.fhir.validation.xhtml)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.fhir.validation.xhtml import check_narrative, unsafe_style, unsafe_url

NS = 'xmlns="http://www.w3.org/1999/xhtml"'


def div(inner: str, attrs: str = "") -> str:
    return f"<div {NS}{attrs}>{inner}</div>"


@pytest.mark.parametrize("inner", [
    "plain text",
    "<p>a <b>bold</b> <i>i</i> <br/> <span class='x' style='color: red'>s</span></p>",
    "<table border='1'><thead><tr><th colspan='2'>h</th></tr></thead>"
    "<tbody><tr><td>1</td><td>2</td></tr></tbody></table>",
    "<a href='http://example.org/x'>link</a> <a href='#frag'>f</a> <a href='Patient/1'>r</a>",
    "<a href='mailto:x@example.org'>m</a> <a href='tel:+491234'>t</a>",
    "<img src='#binary1' alt='x'/>",
    "<ul><li>1</li></ul><ol><li>2</li></ol><pre xml:space='preserve'> x </pre>",
    "<p xml:lang='de' lang='de'>Grüße &amp; &lt;Text&gt; &#169;</p>",
    "<!-- a plain comment --> text",
])
def test_safe_narrative_passes(inner: str) -> None:
    assert check_narrative(div(inner)) == []


#: the IG Publisher's rendering of a Questionnaire (as in the SDC examples): icons
#: inlined as data: images, tree-table lines as relative CSS background images
IG_PUBLISHER_TABLE = (
    "<table style='border: 0px #F0F0F0 solid; font-size: 11px;'><tr>"
    "<td style='vertical-align: top; text-align : left; background-color: white;"
    " background-image: url(tbl_bck1.png)' class='hierarchy'>"
    "<img src='tbl_spacer.png' alt='.' style='background-color: inherit' class='hierarchy'/>"
    "<img src='data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAABAAAAAQCAYAAAAf8/9hAAAA'"
    " alt='.' style='background-color: white; background-color: inherit'"
    " class='hierarchy'/> name</td>"
    "<td style=\"background-image: url('data:image/gif;base64,R0lGODlhAQABAAAAACw=')\">"
    "x</td></tr></table>")


def test_ig_publisher_narrative_passes() -> None:
    assert check_narrative(div(IG_PUBLISHER_TABLE)) == []


@pytest.mark.parametrize("inner", [
    "<a href='data:image/png;base64,iVBORw0KGgo='>a data: link is not an image</a>",
    "<img src='data:text/html;base64,PHNjcmlwdD4='  alt='x'/>",
    "<span style='background: url(//evil.example/t.gif)'>protocol-relative</span>",
    "<span style='background: url(\"https://evil.example/t.gif\")'>another site</span>",
    "<span style='background: url(a.png), url(javascript:alert(1))'>second url</span>",
    "<span style='background: url(&apos;data:text/html,x&apos;)'>not an image</span>",
])
def test_data_urls_only_as_images_and_css_urls_only_on_the_site(inner: str) -> None:
    assert [key for key, _ in check_narrative(div(inner))] == ["txt-1"]


@pytest.mark.parametrize("inner", [
    "<script>alert(1)</script>",
    "<SCRIPT>alert(1)</SCRIPT>",
    "<iframe src='http://evil.example'></iframe>",
    "<object data='x'></object>",
    "<embed src='x'/>",
    "<form action='x'><input name='a'/></form>",
    "<style>p { color: red }</style>",
    "<link rel='stylesheet' href='x'/>",
    "<base href='http://evil.example/'/>",
    "<meta http-equiv='refresh' content='0;url=http://evil.example'/>",
    "<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)</script></svg>",
    "<math xmlns='http://www.w3.org/1998/Math/MathML'/>",
    "<h:script xmlns:h='http://www.w3.org/1999/xhtml'>alert(1)</h:script>",
    "<html><body>x</body></html>",
])
def test_forbidden_elements_are_rejected(inner: str) -> None:
    problems = check_narrative(div("x" + inner))
    assert problems and all(key == "txt-1" for key, _ in problems)


@pytest.mark.parametrize("attrs", [
    "onclick='alert(1)'", "ONCLICK='alert(1)'", "onmouseover='x'", "onload='x'",
    "formaction='x'", "srcdoc='x'", "xlink:href='x' xmlns:xlink='http://www.w3.org/1999/xlink'",
])
def test_event_handlers_and_foreign_attributes_are_rejected(attrs: str) -> None:
    assert check_narrative(div(f"<p {attrs}>x</p>")) != []


@pytest.mark.parametrize("url", [
    "javascript:alert(1)",
    "JavaScript:alert(1)",
    "JAVASCRIPT:alert(1)",
    " javascript:alert(1)",
    "\tjavascript:alert(1)",
    "java\tscript:alert(1)",
    "java&#x09;script:alert(1)",
    "java&#10;script:alert(1)",
    "java&#13;script:alert(1)",
    "&#106;avascript:alert(1)",
    "&#x6A;&#x61;&#x76;&#x61;&#x73;&#x63;&#x72;&#x69;&#x70;&#x74;&#x3A;alert(1)",
    "&#0000106;avascript:alert(1)",
    "jav&#x0;ascript:alert(1)",
    "javascript&#58;alert(1)",
    "javascript&#x3a;alert(1)",
    "&#x01;javascript:alert(1)",
    "\u200bjavascript:alert(1)",
    "java\u00adscript:alert(1)",
    "vbscript:msgbox(1)",
    "VBScript:msgbox(1)",
    "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    "DATA:text/html,<script>alert(1)</script>",
    "d&#97;ta:text/html,x",
    "file:///etc/passwd",
    "livescript:x",
])
@pytest.mark.parametrize("where", ["a href", "img src", "area href", "blockquote cite",
                                   "q cite", "img longdesc"])
def test_script_urls_are_rejected_in_every_spelling(url: str, where: str) -> None:
    element, attr = where.split()
    value = url.replace("<", "&lt;").replace("'", "&apos;")
    inner = f"<{element} {attr}='{value}'>x</{element}>" if element != "img" else \
        f"<img {attr}='{value}' alt='x'/>"
    if element == "area":
        inner = f"<map name='m'><area {attr}='{value}' alt='x'/></map>x"
    problems = check_narrative(div(inner))
    assert problems, url
    assert all(key == "txt-1" for key, _ in problems)


@pytest.mark.parametrize("entity", ["&colon;", "&Tab;", "&NewLine;", "&lpar;"])
def test_html5_named_entities_are_not_xml(entity: str) -> None:
    assert check_narrative(div(f"<a href='javascript{entity}alert(1)'>x</a>")) != []


@pytest.mark.parametrize("style", [
    "background: url(javascript:alert(1))",
    "background: url('http://evil.example/track.gif')",
    "width: expression(alert(1))",
    "width: EXPRESSION(alert(1))",
    "width: exp/**/ression(alert(1))",
    "width: \\65 xpression(alert(1))",
    "background: u\\72l(javascript:x)",
    "-moz-binding: url(x)",
    "behavior: url(x.htc)",
    "@import 'http://evil.example/x.css'",
    "background-image: image-set('x.png' 1x)",
])
def test_dangerous_css_is_rejected(style: str) -> None:
    value = style.replace("'", "&apos;")
    assert check_narrative(div(f"<span style='{value}'>x</span>")) != []
    assert unsafe_style(style) is not None


#: CSS escapes are decoded first (CSS Syntax 3, 4.3.7), then the URL parser reads a
#: backslash as a slash (WHATWG URL, special schemes) and drops tabs and newlines
@pytest.mark.parametrize("style", [
    "background: url('\\\\/evil.example/pixel.png')",  # CSS \\/ is \/, the URL //
    "background: url(\\2f\\2f evil.example/p.png)",
    "background: url(\\2F \\2F evil.example/p.png)",
    "background: url('/\\\\evil.example/p.png')",
    "background: url(\\5c/evil.example/p.png)",
    "background: url(\\5c \\5c evil.example/p.png)",
    "background: url('\\\\\\\\evil.example/p.png')",
    "background: url(\\/\\/evil.example/p.png)",
    "background: url('/\t/evil.example/p.png')",
    "background: url('/\n\\\\evil.example/p.png')",
    "background: url(\"\\\n/\\/evil.example/p.png\")",
    "background: url('\\68 ttps://evil.example/p.png')",
])
def test_css_urls_to_other_hosts_are_rejected_however_escaped(style: str) -> None:
    assert unsafe_style(style) == "url(", style
    value = style.replace("'", "&apos;").replace("\t", "&#9;").replace("\n", "&#10;")
    assert [key for key, _ in check_narrative(div(f"<span style='{value}'>x</span>"))
            ] == ["txt-1"]


@pytest.mark.parametrize("style", [
    "background: url('\\/img/a.png')",  # CSS \/ is /: a path on the site
    "background: url(img\\2f a.png)",
    "background: url('/\\evil.png')",  # \e is U+000E: the path /\x0evil.png
    "background: url(img\\\\a.png)",  # img\a.png, the URL img/a.png
])
def test_css_urls_on_the_site_pass_with_escapes(style: str) -> None:
    assert unsafe_style(style) is None, style


@pytest.mark.parametrize("text", [
    "<!DOCTYPE div [<!ENTITY x 'y'>]><div xmlns='http://www.w3.org/1999/xhtml'>&x;</div>",
    "<!doctype html><div xmlns='http://www.w3.org/1999/xhtml'>x</div>",
    '<?xml version="1.0"?><div xmlns="http://www.w3.org/1999/xhtml">x</div>',
    div("<?php echo 1 ?>x"),
    div("<![CDATA[<script>alert(1)</script>]]>x"),
    div("&xxe;"),
    '<!DOCTYPE d SYSTEM "http://evil.example/x.dtd"><div xmlns="http://www.w3.org/1999/xhtml">x'
    "</div>",
    div("<!--[if IE]><script>alert(1)</script><![endif]-->x"),
    div("<!-- x --><p>y</p><!-- <img src=x onerror=alert(1)> -->"),
])
def test_dtds_entities_cdata_and_markup_comments_are_rejected(text: str) -> None:
    assert check_narrative(text) != []


@pytest.mark.parametrize("text", [
    "<p xmlns='http://www.w3.org/1999/xhtml'>x</p>",  # the root must be a div
    "<div>x</div>",  # in the XHTML namespace
    "<div xmlns='http://www.w3.org/1999/xhtml'>x",  # well-formed
    "<div xmlns='http://www.w3.org/1999/xhtml'>x</div><div>y</div>",
    "just text",
])
def test_the_narrative_is_one_xhtml_div(text: str) -> None:
    assert check_narrative(text) != []


def test_txt_2_narrative_needs_content() -> None:
    assert check_narrative(div("  \n ")) == [
        ("txt-2", "the narrative has no non-whitespace content")]
    assert check_narrative(div("<p> </p>")) != []
    assert check_narrative(div("<img src='#a' alt=''/>")) == []


def test_unsafe_url_ignores_relative_references() -> None:
    assert not unsafe_url("Patient/1")
    assert not unsafe_url("#x")
    assert not unsafe_url("http://example.org/a:b")
    assert not unsafe_url("https://example.org")
    assert unsafe_url("javascript:x")
    assert not unsafe_url("data:image/png;base64,AAAA", image=True)
    assert unsafe_url("data:image/png;base64,AAAA")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_never_crashes(text: str) -> None:
    problems = check_narrative(text)
    assert isinstance(problems, list)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("<>/=\"' &#;:abcdiv"), max_size=80))
def test_arbitrary_markup_never_crashes(inner: str) -> None:
    assert isinstance(check_narrative(div(inner)), list)
