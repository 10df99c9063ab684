"""``megarec stats``: Table 1 figures per domain, as a table or JSON, with clear errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from megarec.cli import main
from megarec.data.readers import read_domain
from megarec.data.sample import sample_paths

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_stats_json_on_the_sample(capsys):
    paths = [str(p) for p in sample_paths()]
    assert main(["stats", *paths, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["domain"] for r in rows] == ["Scientific", "Office", "Games"]
    for row, path in zip(rows, paths):
        raw = json.loads((Path(path) / f"{row['domain']}.inter.json").read_text())
        inter = sum(len(s) for s in raw.values())
        items = len({i for s in raw.values() for i in s})
        assert set(row) == {"domain", "users", "items", "interactions", "avg_len", "sparsity"}
        assert (row["users"], row["items"], row["interactions"]) == (len(raw), items, inter)
        assert row["avg_len"] == pytest.approx(inter / len(raw))
        assert row["sparsity"] == pytest.approx(1 - inter / (len(raw) * items))


def test_stats_table_and_kcore(tmp_path, capsys):
    folder = tmp_path / "Tiny"
    folder.mkdir()
    (folder / "Tiny.inter.json").write_text(json.dumps({"a": [0, 1, 2, 3], "b": [1, 2, 3, 4, 0], "c": [9, 0]}))
    assert main(["stats", str(folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "| domain | users | items | interactions | avg_len | sparsity |"
    assert out[2] == "| Tiny | 3 | 6 | 11 | 3.6667 | 0.3889 |"
    assert main(["stats", str(folder), "--kcore", "2", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["users"], row["items"], row["interactions"]) == (2, 4, 8)  # items 4 and 9 (1 review each) go, then user c


def test_stats_errors_exit_2(tmp_path, capsys):
    assert main(["stats", str(tmp_path / "missing")]) == 2
    assert "megarec stats: error:" in capsys.readouterr().err
    (tmp_path / "Bad.inter.json").write_text('{"u": [1, 2,}')
    assert main(["stats", str(tmp_path / "Bad.inter.json")]) == 2
    assert re.search(r"Bad\.inter\.json:1:\d+: broken JSON", capsys.readouterr().err)


@pytest.mark.skipif(not (SHARED / "README.md").is_file(), reason="needs the shared Amazon data (../shared/data)")
def test_stats_match_the_shared_data_readme():
    table = {}
    for line in (SHARED / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 6 and cells[0] in ("Scientific", "Office", "Games", "Instruments"):
            table[cells[0]] = cells
    assert len(table) == 4
    for name, cells in table.items():
        st = read_domain(SHARED / "amazon" / name).stats()
        assert st["domain"] == name
        assert f"{st['users']:,}" == cells[2] and f"{st['items']:,}" == cells[3]
        assert f"{st['interactions']:,}" == cells[4] and f"{st['avg_len']:.2f}" == cells[5]
