"""Understand and clean preference data before training on it (`preftune data ...`).

Each command of `preftune data` is a thin shell (cli.py) over a function here that works on a
list of rows, a `datasets.Dataset` or a streamed source (`RowStream`, io.py):

    inspect.py        inspect(rows)        -> report: bad rows, turns, lengths, length bias,
                                              duplicates, margins, subsets, reward agreement
    dedup.py          dedup(rows)          -> kept rows, report (exact + MinHash LSH)
    decontaminate.py  decontaminate(rows, NgramIndex) -> kept rows, report (13-gram overlap)
    binarize.py       binarize(rows)       -> pairs with margins from rated completions
    relabel.py        relabel(rows, reward) -> pairs reordered by a reward source
    split.py          split(rows)          -> ("train" | "test", row), prompts never on both sides

Rows are parsed by the same rules as training (pairs.py reuses data.formats).
"""

from preftune.datatools.binarize import BinarizeReport, binarize, parse_rating
from preftune.datatools.decontaminate import (
    DecontaminationReport,
    NgramIndex,
    decontaminate,
)
from preftune.datatools.dedup import (
    DedupReport,
    NearDuplicateFinder,
    dedup,
    find_duplicates,
)
from preftune.datatools.inspect import chosen_length_bias, inspect
from preftune.datatools.io import RowStream, RowWriter, write_rows
from preftune.datatools.relabel import RelabelReport, relabel
from preftune.datatools.split import SplitReport, split

__all__ = [
    "BinarizeReport",
    "DecontaminationReport",
    "DedupReport",
    "NearDuplicateFinder",
    "NgramIndex",
    "RelabelReport",
    "RowStream",
    "RowWriter",
    "SplitReport",
    "binarize",
    "decontaminate",
    "dedup",
    "find_duplicates",
    "inspect",
    "chosen_length_bias",
    "parse_rating",
    "relabel",
    "split",
    "write_rows",
]
