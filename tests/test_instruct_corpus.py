"""scripts/train_instruct_teacher.py's corpus: the text it takes from man pages, docstrings and dpkg's status file,
checked against replies written by hand, and its split, the one `kdcache capture` gives."""

import gzip
import json
import sys
from pathlib import Path

from pipeline.corpus import record_key, split_of

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import train_instruct_teacher as it  # noqa: E402

MAN = r""".TH TAR 1
.SH NAME
tar \- an archiving utility
.SH SYNOPSIS
.B tar
[\fIOPTION\fR...]
.SH DESCRIPTION
\fBGNU tar\fR saves many files together into a single tape or disk archive.
.B tar
can restore them. Third sentence is left out.
.SH OPTIONS
"""

STATUS = """Package: zstd
Status: install ok installed
Description: fast lossless compression algorithm -- CLI tool
 Zstd, short for Zstandard, is a fast lossless compression algorithm,
 targeting real-time compression scenarios.
 .
 This package contains the CLI program.

Package: nodesc
Status: install ok installed
"""

PY = '''"""Module."""
def public(a):
    """Return the sum of a and its neighbours.

    More text that is left out."""
def _private():
    """Hidden from users of this module."""
class Box:
    """A box that holds one value at a time."""
    def put(self, v):
        """Store v in the box, replacing the old one."""
    def _peek(self):
        """Private method docstring here."""
'''


def test_cap_words_cuts_at_a_sentence_end_or_adds_a_period():
    assert it.cap_words("a b  c", 5) == "a b c"
    assert it.cap_words("one two three. four five six seven", 5) == "one two three."
    assert it.cap_words("one two three four five six seven", 5) == "one two three four five."


def test_man_page_reply_is_its_name_line_and_first_two_description_sentences(tmp_path):
    (tmp_path / "tar.1.gz").write_bytes(gzip.compress(MAN.encode()))
    assert it.man_pages(tmp_path) == [("tar", "An archiving utility. GNU tar saves many files together into a single "
                                              "tape or disk archive. tar can restore them.")]


def test_python_docs_take_public_functions_classes_and_methods(tmp_path):
    (tmp_path / "boxes.py").write_text(PY)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "t.py").write_text(PY)                 # test packages are left out
    assert it.python_docs(tmp_path) == [("boxes.public", "Return the sum of a and its neighbours."),
                                        ("boxes.Box", "A box that holds one value at a time."),
                                        ("boxes.Box.put", "Store v in the box, replacing the old one.")]


def test_debian_reply_is_the_short_and_first_long_paragraph(tmp_path):
    (tmp_path / "status").write_text(STATUS)
    assert it.debian_packages(tmp_path / "status") == [
        ("zstd", "Fast lossless compression algorithm -- CLI tool. Zstd, short for Zstandard, is a fast lossless "
                 "compression algorithm, targeting real-time compression scenarios.")]


def test_the_teachers_split_is_captures_split():
    """The teacher trains on split_of(record_key(record)) == 'train'; capture keys a record by its JSON the same way,
    whatever its other fields (the corpus' `source`) and key order."""
    a = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}], "source": "man"}
    b = {"source": "python", "messages": a["messages"]}
    assert record_key(a) == record_key(b) == json.dumps({"messages": a["messages"]}, sort_keys=True)
    splits = [split_of(record_key({"messages": [{"role": "user", "content": str(i)}]}), 0, 0.1) for i in range(2000)]
    assert 150 < splits.count("val") < 250
