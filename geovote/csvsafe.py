"""Cells of the CSV files geovote writes, safe to open in a spreadsheet and exact to read back.

A cell whose text starts with = + - @ (or a tab or carriage return) is a formula to Excel, LibreOffice and
Google Sheets: a photo named `=HYPERLINK(...).jpg` would run when a rejects file or an answers table is
opened. Such text gets a leading apostrophe, which spreadsheets show as text (OWASP's advice on CSV
injection); text that already starts with an apostrophe gets one more, so `uncell` undoes `cell` exactly
for the files the project reads back (failures.csv, predictions). Numbers are written as they are, and
text that is a plain number (a negative longitude read as text) is left alone.

Text that is not valid UTF-8 (a file name's undecodable bytes, held by Python as lone surrogates) is
written with those bytes as \\xNN escapes (`printable`): a CSV or JSON file always holds valid UTF-8.
"""
from __future__ import annotations

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def printable(text: str) -> str:
    """`text` with any undecodable file-name bytes (lone surrogates) as \\xNN escapes; else unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def cell(value):
    """A value as a CSV cell no spreadsheet runs (see the module's doc); None -> ""."""
    if value is None:
        return ""
    if not isinstance(value, str):
        return value
    value = printable(value)
    if value.startswith(FORMULA_START + (QUOTE,)) and not _is_number(value):
        return QUOTE + value
    return value


def row(values) -> list:
    return [cell(v) for v in values]


def uncell(text: str) -> str:
    """The text `cell` was given (for the files the project reads back)."""
    if text.startswith(QUOTE) and text[1:].startswith(FORMULA_START + (QUOTE,)):
        return text[1:]
    return text
