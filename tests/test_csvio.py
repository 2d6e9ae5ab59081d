"""CSV reading: rows are numbered as a spreadsheet numbers them, whatever the cells hold."""

from __future__ import annotations

import pytest

from comoto_cli.errors import InputDataError
from comoto_cli.utils.csvio import read_csv


def test_a_record_is_numbered_by_its_first_line_when_a_quoted_cell_holds_newlines(tmp_path):
    path = tmp_path / "t.csv"
    # CBIS-DDSM's ROI-mask cells end in a quoted newline: every record spans two lines.
    path.write_text('a,b\n1,"x\n"\n2,"y\n"\n\n3,z\n', encoding="utf-8")
    table = read_csv(path, ["a", "b"])
    assert table.rows == [2, 4, 7] and table.text("a") == ["1", "2", "3"]
    path.write_text('a,b\n1,"x\n"\nnot-a-number,"y\n"\n', encoding="utf-8")
    with pytest.raises(InputDataError, match="row 4"):
        read_csv(path, ["a", "b"]).floats("a")
