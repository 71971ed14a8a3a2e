"""Dice tables: accumulate per-case scores, aggregate, write ``summary.json`` and Markdown.

:class:`DiceTable` follows MONAI's metric habit (add per case, then ``aggregate()``) and
nnU-Net's ``summary.json`` (per-case values plus per-class means, NaN when a class is
absent from both maps, ignored by the means). The Markdown table mirrors the top section
of the paper's Table 1: one row per method, one column per class and ``Avg``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mixpriv.evaluation.dice import dice_per_class, foreground_labels, mean_foreground
from mixpriv.validation import ArrayLike, InputError

logger = logging.getLogger(__name__)

#: Method rows in the order of the paper's Table 1 (the compared systems after the baseline); other methods follow
#: in insertion order.
METHOD_ORDER = ("Baseline", "Privacy-Net", "Deformation-Proxy", "Naive", "Naive+TTA", "Learned", "Learned+TTA")

#: Key of the per-case mean foreground Dice in :meth:`DiceTable.aggregate`.
MEAN_KEY = "mean"

SUMMARY_FILE = "summary.json"
TABLE_FILE = "table.md"

Aggregate = dict[str, dict[str, dict[str, float | int]]]


def order_methods(methods: list[str] | tuple[str, ...]) -> list[str]:
    """Sort method names into Table 1 order, unknown methods appended in their given order.

    Example:
        >>> order_methods(["Mine", "Learned+TTA", "Baseline"])
        ['Baseline', 'Learned+TTA', 'Mine']
    """
    known = [method for method in METHOD_ORDER if method in methods]
    return known + [method for method in methods if method not in METHOD_ORDER]


def _nan_stats(values: list[float]) -> dict[str, float | int]:
    """Mean, population std (ddof=0) and count of the non-NaN values; NaN stats when none."""
    array = np.asarray(values, dtype=np.float64)
    array = array[~np.isnan(array)]
    if array.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(array.mean()), "std": float(array.std()), "n": int(array.size)}


def to_json(obj: Any) -> Any:
    """Convert ``obj`` to plain JSON types, writing NaN as ``None`` (``null``).

    Example:
        >>> to_json({"a": float("nan"), "b": (1, np.float32(0.5))})
        {'a': None, 'b': [1, 0.5]}
    """
    if isinstance(obj, Mapping):
        return {str(key): to_json(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, np.generic):
        return to_json(obj.item())
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"cannot write {type(obj).__name__} to summary.json: {obj!r}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a GitHub Markdown table.

    Example:
        >>> print("\\n".join(markdown_table(["a", "b"], [["1", "2"]])))
        | a | b |
        |---|---|
        | 1 | 2 |
    """
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(row) + " |" for row in rows]]


def _format_cell(stats: Mapping[str, float | int], digits: int) -> str:
    """``0.912 ± 0.013``, or an em dash when the class was never present."""
    if stats["n"] == 0 or math.isnan(stats["mean"]):
        return "—"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


class DiceTable:
    """Per-case Dice of several methods, aggregated into a Table-1-style report.

    Args:
        labels: class name -> label value (``dataset.json["labels"]``); the background
            (value 0) is kept in ``summary.json`` but gets no column.
        metadata: free-form information saved with the table (model, K, λ range, ...).

    Example:
        >>> table = DiceTable({"background": 0, "GM": 1, "WM": 2})
        >>> table.add("Learned", "case_0", {"GM": 0.9, "WM": 0.8})
        >>> table.add("Learned", "case_1", {"GM": 0.7, "WM": float("nan")})
        >>> stats = table.aggregate()["Learned"]
        >>> round(stats["GM"]["mean"], 3), stats["WM"]["n"], round(stats["mean"]["mean"], 3)
        (0.8, 1, 0.775)
    """

    def __init__(self, labels: Mapping[str, int], metadata: Mapping[str, Any] | None = None) -> None:
        self.labels = {str(name): int(value) for name, value in labels.items()}
        self.classes = list(foreground_labels(self.labels))
        if not self.classes:
            raise InputError(f"the label set {self.labels} has no foreground class (value != 0)")
        if MEAN_KEY in self.classes:
            raise InputError(f"a class may not be called {MEAN_KEY!r}: the name is kept for the mean foreground Dice")
        self.metadata: dict[str, Any] = dict(metadata or {})
        self.per_case: dict[str, dict[str, dict[str, float]]] = {}

    @property
    def methods(self) -> list[str]:
        """Methods present, in Table 1 order (unknown ones appended in insertion order)."""
        return order_methods(list(self.per_case))

    def add(self, method: str, case_id: str, dice: Mapping[str, float]) -> None:
        """Record the Dice of one case for one method.

        Args:
            method: row name, e.g. one of :data:`METHOD_ORDER`.
            case_id: case identifier, unique within a method.
            dice: class name -> Dice, exactly the foreground classes of the table.

        Raises:
            InputError: on missing or unknown classes, or a case already recorded for ``method``.

        Example:
            >>> table = DiceTable({"background": 0, "tumour": 1})
            >>> table.add("Baseline", "BraTS_001", {"tumour": 0.87})
            >>> table.per_case["Baseline"]["BraTS_001"]
            {'tumour': 0.87}
        """
        missing = [name for name in self.classes if name not in dice]
        unknown = [name for name in dice if name not in self.classes]
        if missing or unknown:
            raise InputError(
                f"Dice of {method}/{case_id} must have the classes {self.classes}; "
                f"missing {missing}, unknown {unknown}"
            )
        cases = self.per_case.setdefault(method, {})
        if case_id in cases:
            raise InputError(f"case {case_id!r} is already recorded for method {method!r}")
        cases[case_id] = {name: float(dice[name]) for name in self.classes}

    def add_prediction(self, method: str, case_id: str, prediction: ArrayLike, target: ArrayLike) -> dict[str, float]:
        """Compute :func:`dice_per_class` of a label map against its target and record it.

        Example:
            >>> import numpy as np
            >>> table = DiceTable({"background": 0, "fg": 1})
            >>> table.add_prediction("Naive", "c0", np.array([0, 1, 1]), np.array([0, 1, 0]))
            {'fg': 0.6666666666666666}
        """
        dice = dice_per_class(prediction, target, self.labels)
        self.add(method, case_id, dice)
        return dice

    def aggregate(self) -> Aggregate:
        """Mean, std and count over cases, per method, per class and for the mean foreground Dice.

        NaN cases (class absent from both maps) are ignored; ``n`` counts the cases that
        entered each mean. ``std`` is the population standard deviation (``np.nanstd``,
        ddof=0). The ``"mean"`` entry averages each case's mean foreground Dice.

        Returns:
            ``{method: {class_or_"mean": {"mean": float, "std": float, "n": int}}}``,
            methods in Table 1 order.

        Example:
            >>> table = DiceTable({"background": 0, "fg": 1})
            >>> table.add("Baseline", "a", {"fg": 1.0}); table.add("Baseline", "b", {"fg": 0.5})
            >>> table.aggregate()["Baseline"]["fg"]
            {'mean': 0.75, 'std': 0.25, 'n': 2}
        """
        result: Aggregate = {}
        for method in self.methods:
            cases = list(self.per_case[method].values())
            stats = {name: _nan_stats([case[name] for case in cases]) for name in self.classes}
            stats[MEAN_KEY] = _nan_stats([mean_foreground(case) for case in cases])
            result[method] = stats
        return result

    def to_markdown(self, title: str | None = None, notes: Mapping[str, str] | None = None, digits: int = 3,
                    caption: str = "Dice per case (NaN when a class is absent from both maps, ignored)") -> str:
        """Render the aggregate as a Markdown table: methods × (classes in label order, ``Avg``).

        Args:
            title: optional heading written above the table.
            notes: settings printed under the table as ``- key: value`` lines.
            digits: decimals of each ``mean ± std`` cell.
            caption: what the cells are, printed under the table before the case count.

        Returns:
            The Markdown text, ending with a newline.

        Example:
            >>> table = DiceTable({"background": 0, "GM": 1})
            >>> table.add("Learned", "c0", {"GM": 0.9})
            >>> print(table.to_markdown(notes={"K": "8"}))
            | Method | GM | Avg |
            |---|---|---|
            | Learned | 0.900 ± 0.000 | 0.900 ± 0.000 |
            <BLANKLINE>
            Dice per case (NaN when a class is absent from both maps, ignored); mean ± std over 1 case(s).
            <BLANKLINE>
            - K: 8
            <BLANKLINE>
        """
        aggregate = self.aggregate()
        lines = [f"## {title}", ""] if title else []
        rows = [[method.replace("|", "\\|"), *(_format_cell(stats[name], digits) for name in [*self.classes, MEAN_KEY])]
                for method, stats in aggregate.items()]
        lines.extend(markdown_table(["Method", *self.classes, "Avg"], rows))
        counts = {method: len(cases) for method, cases in self.per_case.items()}
        if len(set(counts.values())) == 1:
            n_text = f"{next(iter(counts.values()))} case(s)"
        else:
            n_text = "cases (" + ", ".join(f"{method}: {counts[method]}" for method in self.methods) + ")"
        lines += ["", f"{caption}; mean ± std over {n_text}."]
        if notes:
            lines.append("")
            lines += [f"- {key}: {value}" for key, value in notes.items()]
        return "\n".join(lines) + "\n"

    def to_dict(self, metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The nnU-Net-like summary as a JSON-ready dict (NaN as ``None``)."""
        summary = {
            "metadata": {**self.metadata, **(metadata or {})},
            "labels": self.labels,
            "per_case": {method: self.per_case[method] for method in self.methods},
            "aggregate": self.aggregate(),
        }
        return to_json(summary)

    def save(
        self,
        out_dir: str | Path,
        metadata: Mapping[str, Any] | None = None,
        *,
        title: str | None = None,
        notes: Mapping[str, str] | None = None,
    ) -> dict[str, Path]:
        """Write ``summary.json`` (valid JSON, NaN as ``null``) and ``table.md`` into ``out_dir``.

        Args:
            out_dir: folder to write into (created if needed).
            metadata: merged over the table's own ``metadata`` and stored under ``"metadata"``.
            title: heading of ``table.md``.
            notes: lines under the table in ``table.md``.

        Returns:
            ``{"summary": path of summary.json, "table": path of table.md}``.

        Example:
            >>> import tempfile
            >>> table = DiceTable({"background": 0, "fg": 1})
            >>> table.add("Baseline", "c0", {"fg": float("nan")})
            >>> paths = table.save(tempfile.mkdtemp(), metadata={"K": 8})
            >>> sorted(paths)
            ['summary', 'table']
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        summary_path = out_dir / SUMMARY_FILE
        table_path = out_dir / TABLE_FILE
        text = json.dumps(self.to_dict(metadata), indent=2, allow_nan=False, ensure_ascii=False)
        summary_path.write_text(text + "\n", encoding="utf-8")
        table_path.write_text(self.to_markdown(title=title, notes=notes), encoding="utf-8")
        logger.info("wrote %s and %s", summary_path, table_path)
        return {"summary": summary_path, "table": table_path}

    @classmethod
    def from_summary(cls, path: str | Path) -> DiceTable:
        """Reload a table written by :meth:`save` (``null`` read back as NaN).

        Args:
            path: a ``summary.json`` file, or the folder that holds one.

        Example:
            >>> import tempfile
            >>> table = DiceTable({"background": 0, "fg": 1}, metadata={"K": 8})
            >>> table.add("Naive", "c0", {"fg": 0.5})
            >>> again = DiceTable.from_summary(table.save(tempfile.mkdtemp())["summary"])
            >>> again.per_case == table.per_case, again.metadata
            (True, {'K': 8})
        """
        path = Path(path)
        if path.is_dir():
            path = path / SUMMARY_FILE
        summary = json.loads(path.read_text(encoding="utf-8"))
        for key in ("labels", "per_case"):
            if key not in summary:
                raise InputError(f"{path} is not a mixpriv Dice summary: it has no {key!r} entry")
        table = cls(summary["labels"], metadata=summary.get("metadata"))
        for method, cases in summary["per_case"].items():
            for case_id, dice in cases.items():
                table.add(method, case_id, {name: float("nan") if v is None else v for name, v in dice.items()})
        return table
