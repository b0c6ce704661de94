"""Rows held in memory, for data that needs no Arrow: a bundled dataset. A `Rows` answers
the part of `datasets.Dataset`'s API the data layer uses (len, column_names, select,
select_columns, to_list, to_dict, to_json lines), so partitioners and formats take either; `datasets`
(with pyarrow and pandas: +80 MiB and 1-3 s per process) is imported only to load a local
file or a Hub dataset."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


class Rows:
    """A list of row dicts whose columns are the first row's keys (as `Dataset.from_list`)."""

    def __init__(self, rows: list[dict], columns: list[str] | None = None):
        self._rows = rows
        self._columns = list(columns if columns is not None else (rows[0] if rows else []))

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def column_names(self) -> list[str]:
        return list(self._columns)

    def select(self, indices: Iterable[int]) -> Rows:
        return Rows([self._rows[int(i)] for i in indices], self._columns)

    def select_columns(self, columns: list[str]) -> Rows:
        return Rows(self._rows, [c for c in self._columns if c in columns])

    def to_list(self) -> list[dict]:
        return [{c: row.get(c) for c in self._columns} for row in self._rows]

    def to_dict(self) -> dict[str, list]:
        return {c: [row.get(c) for row in self._rows] for c in self._columns}

    def to_json(self, path: str | Path, lines: bool = True, force_ascii: bool = False) -> None:
        """One JSON object per line (the only form fedllm writes: `fedllm split`)."""
        if not lines:
            raise ValueError("Rows.to_json writes JSON lines only")
        with Path(path).open("w", encoding="utf-8") as f:
            for row in self.to_list():
                f.write(json.dumps(row, ensure_ascii=force_ascii, separators=(",", ":")) + "\n")
