"""XML Patch (gateway.fhir.xmlpatch) on plain XML trees, without HTTP: the node kinds
FHIR XML written by the gateway rarely holds (whitespace, comments, processing
instructions), and parsers that never fail but with an OperationOutcome."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree  # type: ignore[import-untyped]

from gateway.fhir import xmlpatch
from gateway.fhir.outcome import FhirError

DOC = b"<doc>\n  <note>a<!--c1-->b<?pi x?>c</note>\n  <elem a='1'/>\n  <elem a='2'/>\n</doc>"


def patched(*ops: str, doc: bytes = DOC) -> str:
    checked = xmlpatch.check(xmlpatch.parse(("<diff>" + "".join(ops) + "</diff>").encode()))
    root = xmlpatch.apply(etree.fromstring(doc), checked)
    return str(etree.tostring(root, encoding="unicode"))


def test_remove_with_whitespace_directives() -> None:
    assert patched("<remove sel=\"doc/elem[@a='1']\" ws=\"after\"/>") == \
        "<doc>\n  <note>a<!--c1-->b<?pi x?>c</note>\n  <elem a=\"2\"/>\n</doc>"
    assert patched("<remove sel=\"doc/elem[@a='2']\" ws=\"before\"/>") == \
        "<doc>\n  <note>a<!--c1-->b<?pi x?>c</note>\n  <elem a=\"1\"/>\n</doc>"
    assert patched("<remove sel=\"doc/elem[@a='1']\" ws=\"both\"/>") == \
        "<doc>\n  <note>a<!--c1-->b<?pi x?>c</note><elem a=\"2\"/>\n</doc>"
    # the text beside a node removed stays
    assert patched("<remove sel=\"doc/elem[@a='1']\"/>") == \
        "<doc>\n  <note>a<!--c1-->b<?pi x?>c</note>\n  \n  <elem a=\"2\"/>\n</doc>"
    with pytest.raises(FhirError, match="invalid-whitespace-directive"):
        patched('<remove sel="doc/note/comment()" ws="before"/>')  # "a" is no whitespace


def test_text_comments_and_processing_instructions() -> None:
    assert patched('<replace sel="doc/note/text()[2]">B</replace>',
                   '<remove sel="doc/note/comment()"/>',
                   '<replace sel="doc/note/processing-instruction(\'pi\')"><?pi y?></replace>',
                   '<add sel="doc/note/text()[1]" pos="before"><!--c0--></add>',
                   '<add sel="doc/note/text()[2]" pos="after">d<i/></add>',
                   doc=DOC).startswith("<doc>\n  <note><!--c0-->aB<?pi y?>cd<i/></note>")
    with pytest.raises(FhirError, match="invalid-node-types"):
        patched('<replace sel="doc/note/comment()"><x/></replace>')
    with pytest.raises(FhirError, match="unlocated-node"):
        patched('<remove sel="doc/note/processing-instruction(\'other\')"/>')


def test_positions_and_values_in_predicates() -> None:
    assert patched("<replace sel=\"doc/*[2][@a='1']/@a\">x</replace>") == \
        DOC.decode().replace("a='1'", 'a="x"').replace("a='2'", 'a="2"')
    assert "<elem a=\"2\"/>" not in patched("<remove sel=\"doc/elem[.=''][2]\"/>")
    assert patched("<add sel=\"doc[note='abc']\" pos=\"prepend\"><first/></add>") \
        .startswith("<doc><first/>\n  <note>")


#: what selectors are made of, and anything else XML can carry
SELECTORS = st.text(alphabet="/f:doc:elem*[]@='\".()0123 -textcomment", max_size=40) | \
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=40)


@given(SELECTORS)
def test_any_selector_is_checked_or_refused(sel: str) -> None:
    document = etree.Element("diff", nsmap={"f": "urn:f"})
    etree.SubElement(document, "remove", sel=sel)
    with contextlib.suppress(FhirError):
        ops = xmlpatch.check(xmlpatch.Document(list(document)))
        xmlpatch.apply(etree.fromstring(DOC), ops)


@given(st.binary(max_size=200)
       | st.text(max_size=200).map(lambda t: f"<diff>{t}</diff>".encode()))
def test_any_document_is_parsed_or_refused(data: bytes) -> None:
    with contextlib.suppress(FhirError):
        xmlpatch.check(xmlpatch.parse(data))
