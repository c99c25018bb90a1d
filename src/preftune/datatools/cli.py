"""`preftune data <command>`: one typed config per command, each a thin shell over a library
function of this package. Every command reads what training reads and writes its rows (JSON
lines or Parquet) and a `report.json` into `--output-dir`, atomically."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from preftune.config import _require, add_config_arguments, arg
from preftune.datatools.io import (
    OUTPUT_FORMATS,
    RowStream,
    RowWriter,
    progress,
    write_report,
)
from preftune.errors import PreftuneError
from preftune.utils import atomic_output, to_jsonable


@dataclass
class DataToolConfig:
    """Settings shared by every `preftune data` command."""

    data: str = arg(
        "",
        "The data: a JSONL/JSON/Parquet/CSV file or folder, a save_to_disk "
        "folder, or a dataset name for `datasets.load_dataset` (also the first "
        "positional argument).",
    )
    split: str = arg(
        "train",
        "Dataset split to read when `data` is a hub dataset name or a save_to_disk DatasetDict.",
    )
    columns: str = arg(
        "",
        "Column mapping from your names to preftune's, e.g. "
        "`prompt=question,chosen=good,rejected=bad`.",
    )
    output_dir: str = arg(
        "", "Where the outputs and report.json go (default: runs/data-<command>)."
    )
    overwrite: bool = arg(False, "Replace the outputs already in `output_dir`.")

    command = ""  # set by each subclass: the name after `preftune data`

    def validate(self) -> None:
        if not self.data:
            raise PreftuneError(
                f"data: no data given; pass it as `preftune data {self.command} "
                "DATA` or --data DATA"
            )
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise PreftuneError(
                    f"{f.name}: got {getattr(self, f.name)!r}, expected one of "
                    f"{', '.join(map(str, choices))}"
                )

    def out(self) -> Path:
        return Path(self.output_dir or f"runs/data-{self.command}")


@dataclass
class WritingConfig(DataToolConfig):
    """Settings of the commands that write rows."""

    format: str = arg("jsonl", "File format of the rows written.", choices=OUTPUT_FORMATS)


def _prepare_output(cfg: DataToolConfig) -> Path:
    out = cfg.out()
    if (out / "report.json").exists() and not cfg.overwrite:
        raise PreftuneError(
            f"output_dir {out} already holds a report.json; pass --overwrite to "
            "replace it or choose another --output-dir"
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _open(cfg: DataToolConfig) -> RowStream:
    from preftune.trainers.common import resolve_data_source  # `demo`: the built-in HH sample

    return RowStream(resolve_data_source(cfg.data), split=cfg.split, columns=cfg.columns)


class _JsonlSink:
    """An append-only list stand-in that writes each record as a JSON line (atomically on close)."""

    def __init__(self, path: Path):
        self._ctx = atomic_output(path)
        self._file = open(self._ctx.__enter__(), "w", encoding="utf-8")
        self.n = 0

    def append(self, record: dict) -> None:
        import json

        self.n += 1
        self._file.write(json.dumps(to_jsonable(record), ensure_ascii=False) + "\n")

    def close(self, ok: bool = True) -> None:
        self._file.close()
        if ok:
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(RuntimeError, RuntimeError(), None)


def _write_through(cfg, out: Path, rows, sink: _JsonlSink | None = None, stem: str = "data") -> int:
    """Write the kept rows (a generator) to data.<format>; finish or discard the side file."""
    try:
        with RowWriter(out / f"{stem}.{cfg.format}", cfg.format) as writer:
            for row in progress(rows, desc=cfg.command):
                writer.write(row)
    except BaseException:
        if sink is not None:
            sink.close(ok=False)
        raise
    if sink is not None:
        sink.close()
    return writer.n


def _filter_and_write(cfg, out: Path, side_file: str, side_key: str, run) -> tuple[object, dict]:
    """Run a row filter, `run(sink) -> (rows, report)`, that records the rows it leaves out in
    `side_file` (JSON lines); write the rows to data.<format> and the report, naming both files
    (the side file under `side_key`), to report.json. -> (report, what report.json holds)."""
    sink = _JsonlSink(out / side_file)
    try:
        rows, report = run(sink)
    except BaseException:
        sink.close(ok=False)
        raise
    _write_through(cfg, out, rows, sink)
    result = {
        **dataclasses.asdict(report),
        "output": f"data.{cfg.format}",
        side_key: side_file,
        "config": dataclasses.asdict(cfg),
    }
    write_report(result, out / "report.json")
    return report, result


def _reward(cfg) -> object | None:
    if not cfg.reward_model and not cfg.reward_fn:
        return None
    import torch

    from preftune.rewards.sources import parse_reward_spec

    device = "cuda" if torch.cuda.is_available() else None
    return parse_reward_spec(
        cfg.reward_model or None,
        [cfg.reward_fn] if cfg.reward_fn else None,
        None,
        batch_size=cfg.batch_size,
        device=device,
        ensemble_agg=getattr(cfg, "ensemble_agg", "mean"),
        ensemble_coef=getattr(cfg, "ensemble_coef", 1.0),
    )


def _print(lines: list[str]) -> None:
    print("\n".join(lines))


# --- inspect --------------------------------------------------------------------------------


@dataclass
class InspectConfig(DataToolConfig):
    """Settings of `preftune data inspect`."""

    tokenizer: str = arg(
        "",
        "Measure lengths in tokens of this tokenizer (a local folder, a hub "
        "name in the offline cache, or `tiny`); characters when empty.",
    )
    reward_model: str = arg(
        "",
        "Reward model folder (a sequence classifier with one output) "
        "whose agreement with the labels is measured.",
    )
    reward_fn: str = arg(
        "",
        "Reward function `module:function` or `file.py:function`, called "
        "as fn(prompts, completions), whose agreement with the labels is measured.",
    )
    batch_size: int = arg(32, "Texts scored per forward pass of the reward model.")
    near_duplicates: bool = arg(
        True,
        "Look for near-duplicate prompts and pairs (MinHash LSH); "
        "--no-near-duplicates counts exact duplicates only (faster).",
    )
    threshold: float = arg(
        0.8, "Jaccard similarity of word shingles at which two texts are near duplicates."
    )
    num_perm: int = arg(128, "MinHash permutations (more: a closer Jaccard estimate, slower).")
    shingle: int = arg(3, "Words per shingle.")
    confidence: float = arg(0.95, "Confidence level of the Wilson intervals.")
    top_disagreements: int = arg(
        100,
        "Pairs the reward source disagrees with most confidently, written to disagreements.jsonl.",
    )

    command = "inspect"

    def validate(self) -> None:
        super().validate()
        _require(0 < self.threshold <= 1, "threshold", self.threshold, "a number in (0, 1]")
        _require(0 < self.confidence < 1, "confidence", self.confidence, "a number in (0, 1)")
        _require(
            self.top_disagreements >= 0,
            "top_disagreements",
            self.top_disagreements,
            "an integer >= 0",
        )
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")


def run_inspect(cfg: InspectConfig) -> dict:
    from preftune.datatools.inspect import inspect, plot_lengths, render_markdown

    out = _prepare_output(cfg)
    rows = _open(cfg)
    tokenizer = None
    if cfg.tokenizer:
        from preftune.models.loading import load_tokenizer

        tokenizer = load_tokenizer(cfg.tokenizer)
    reward = _reward(cfg)
    report = inspect(
        rows,
        tokenizer=tokenizer,
        reward=reward,
        near_duplicates=cfg.near_duplicates,
        threshold=cfg.threshold,
        num_perm=cfg.num_perm,
        shingle=cfg.shingle,
        confidence=cfg.confidence,
        top_disagreements=cfg.top_disagreements,
        progress=lambda it: progress(it, desc="inspect"),
    )
    arrays = report.pop("_arrays")
    disagreements = report.pop("_disagreements", None)
    report["plots"] = plot_lengths(arrays, report["length_unit"], out)
    if disagreements is not None:
        sink = _JsonlSink(out / "disagreements.jsonl")
        for record in disagreements:
            sink.append(record)
        sink.close()
        report["disagreements_file"] = "disagreements.jsonl"
    report["config"] = dataclasses.asdict(cfg)
    with atomic_output(out / "report.md") as tmp:
        Path(tmp).write_text(render_markdown(report), encoding="utf-8")
    write_report(report, out / "report.json")
    lb = report["length_bias"]
    _print(
        [
            f"{report['source']}: {report['rows']:,} rows, format {report['format']}, "
            f"{report['pairs']:,} pairs, {report['bad_rows']['total']:,} bad rows",
            f"chosen longer in {100 * lb['fraction_chosen_longer']:.1f}% of pairs "
            f"({100 * lb['ci_low']:.1f}% to {100 * lb['ci_high']:.1f}%)",
            f"report: {out / 'report.md'}",
        ]
    )
    return report


# --- dedup ----------------------------------------------------------------------------------


@dataclass
class DedupConfig(WritingConfig):
    """Settings of `preftune data dedup`."""

    on: str = arg(
        "pair",
        "Compare whole examples (prompt and replies) or prompts only.",
        choices=("pair", "prompt"),
    )
    near: bool = arg(
        True, "Also remove near duplicates (MinHash LSH); --no-near removes exact duplicates only."
    )
    threshold: float = arg(
        0.8, "Jaccard similarity of word shingles at which two texts are near duplicates."
    )
    num_perm: int = arg(128, "MinHash permutations (more: a closer Jaccard estimate, slower).")
    shingle: int = arg(3, "Words per shingle.")

    command = "dedup"

    def validate(self) -> None:
        super().validate()
        _require(0 < self.threshold <= 1, "threshold", self.threshold, "a number in (0, 1]")
        _require(self.num_perm >= 16, "num_perm", self.num_perm, "an integer >= 16")
        _require(self.shingle >= 1, "shingle", self.shingle, "an integer >= 1")


def run_dedup(cfg: DedupConfig) -> dict:
    from preftune.datatools.dedup import dedup

    out = _prepare_output(cfg)
    report, result = _filter_and_write(
        cfg,
        out,
        "removed.jsonl",
        "removed_file",
        lambda sink: dedup(
            _open(cfg),
            on=cfg.on,
            threshold=cfg.threshold,
            num_perm=cfg.num_perm,
            shingle=cfg.shingle,
            near=cfg.near,
            removed=sink,
            progress=lambda it: progress(it, desc="find duplicates"),
        ),
    )
    _print(
        [
            f"{report.source}: {report.n_rows:,} rows -> {report.n_kept:,} kept; removed "
            f"{report.exact_duplicates:,} exact and {report.near_duplicates:,} near duplicates",
            f"wrote {out / ('data.' + cfg.format)} and {out / 'report.json'}",
        ]
    )
    return result


# --- decontaminate --------------------------------------------------------------------------


@dataclass
class DecontaminateConfig(WritingConfig):
    """Settings of `preftune data decontaminate`."""

    against: list[str] = arg(
        [],
        "Evaluation sets (files, folders or dataset names; every text field of every item counts).",
    )
    ngram: int = arg(
        13,
        "Words in the shared n-gram that marks a row as contaminated (13 as in "
        "GPT-3's and open-instruct's decontamination).",
    )
    responses: bool = arg(False, "Check the replies too, not only the prompt.")
    against_split: str = arg("train", "Split to read of evaluation sets that are dataset names.")

    command = "decontaminate"

    def validate(self) -> None:
        super().validate()
        if not self.against:
            raise PreftuneError("against: no evaluation set given; pass --against EVAL [EVAL ...]")
        _require(self.ngram >= 1, "ngram", self.ngram, "an integer >= 1")


def run_decontaminate(cfg: DecontaminateConfig) -> dict:
    from preftune.datatools.decontaminate import NgramIndex, decontaminate

    out = _prepare_output(cfg)
    index = NgramIndex(cfg.ngram)
    for name in cfg.against:
        from preftune.trainers.common import resolve_data_source

        index.add_eval_set(name, RowStream(resolve_data_source(name), split=cfg.against_split))
    report, result = _filter_and_write(
        cfg,
        out,
        "removed.jsonl",
        "removed_file",
        lambda sink: decontaminate(_open(cfg), index, responses=cfg.responses, removed=sink),
    )
    lines = [
        f"{report.source}: {report.n_rows:,} rows -> {report.n_kept:,} kept; removed "
        f"{report.n_removed:,} sharing a {cfg.ngram}-gram with an evaluation set"
    ]
    for name, entry in report.eval_sets.items():
        lines.append(f"  {name}: {entry['items']:,} items, {entry['rows_matched']:,} rows matched")
        for ex in entry["examples"][:2]:
            lines.append(f'    {ex["row"]}: "{ex["span"][:100]}"')
    _print(lines + [f"wrote {out / ('data.' + cfg.format)} and {out / 'report.json'}"])
    return result


# --- binarize -------------------------------------------------------------------------------


@dataclass
class BinarizeConfig(WritingConfig):
    """Settings of `preftune data binarize`."""

    rating: str = arg(
        "overall",
        "The rating of a completion: `overall` (overall_score, or the "
        "`scores` list), `mean` (mean of the per-aspect ratings) or an aspect "
        "name (e.g. helpfulness).",
    )
    pairs: str = arg(
        "best-vs-random",
        "Which pairs to make of each prompt's rated completions.",
        choices=("best-vs-random", "best-vs-worst", "all"),
    )
    min_margin: float = arg(
        0.0,
        "Drop pairs whose rating difference is below this (pairs with "
        "equal ratings are always dropped).",
    )
    seed: int = arg(0, "Seed of the random rejected completion of best-vs-random.")

    command = "binarize"

    def validate(self) -> None:
        super().validate()
        _require(self.min_margin >= 0, "min_margin", self.min_margin, "a number >= 0")


def run_binarize(cfg: BinarizeConfig) -> dict:
    from preftune.datatools.binarize import binarize

    out = _prepare_output(cfg)
    report, result = _filter_and_write(
        cfg,
        out,
        "bad_ratings.jsonl",
        "bad_ratings_file",
        lambda sink: binarize(
            _open(cfg),
            rating=cfg.rating,
            pairs=cfg.pairs,
            min_margin=cfg.min_margin,
            seed=cfg.seed,
            bad_ratings=sink,
        ),
    )
    _print(
        [
            f"{report.source}: {report.n_rows:,} rows -> {report.n_pairs:,} pairs "
            f"({cfg.pairs}, rating {cfg.rating}); dropped {report.ties_dropped:,} ties and "
            f"{report.below_min_margin_dropped:,} below the minimum margin; "
            f"{report.bad_ratings:,} ratings that are not numbers (bad_ratings.jsonl)",
            f"wrote {out / ('data.' + cfg.format)} and {out / 'report.json'}",
        ]
    )
    return result


# --- relabel --------------------------------------------------------------------------------


@dataclass
class RelabelConfig(WritingConfig):
    """Settings of `preftune data relabel`."""

    reward_model: str = arg("", "Reward model folder (a sequence classifier with one output).")
    reward_fn: str = arg(
        "",
        "Reward function `module:function` or `file.py:function`, called "
        "as fn(prompts, completions).",
    )
    keep_agreement: bool = arg(
        False, "Drop the pairs the reward source disagrees with instead of flipping them."
    )
    batch_size: int = arg(32, "Texts scored per forward pass of the reward model.")
    ensemble_agg: str = arg(
        "mean",
        "How the members of a reward-model ensemble (a folder from "
        "`preftune reward --ensemble K`) are combined (Coste et al. 2023): "
        "mean; min (worst case); mean-minus-std or mean-minus-var.",
        choices=("mean", "min", "mean-minus-std", "mean-minus-var"),
    )
    ensemble_coef: float = arg(
        1.0,
        "The multiple of the members' std (or variance) that "
        "mean-minus-std (mean-minus-var) subtracts.",
    )

    command = "relabel"

    def validate(self) -> None:
        super().validate()
        if bool(self.reward_model) == bool(self.reward_fn):
            raise PreftuneError(
                "relabel needs exactly one reward source: --reward-model PATH or "
                "--reward-fn module:function"
            )
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        # Imported here: preftune.rewards imports torch; `preftune data --help` need not.
        from preftune.rewards.sources import check_ensemble_settings, is_ensemble

        check_ensemble_settings(
            self.ensemble_agg, self.ensemble_coef, is_ensemble(self.reward_model), self.reward_model
        )


def run_relabel(cfg: RelabelConfig) -> dict:
    from preftune.datatools.relabel import relabel

    out = _prepare_output(cfg)
    pairs, report = relabel(_open(cfg), _reward(cfg), keep_agreement=cfg.keep_agreement)
    _write_through(cfg, out, pairs)
    result = {
        **dataclasses.asdict(report),
        "output": f"data.{cfg.format}",
        "config": dataclasses.asdict(cfg),
    }
    write_report(result, out / "report.json")
    action = "dropped" if cfg.keep_agreement else "flipped"
    _print(
        [
            f"{report.source}: {report.n_pairs:,} pairs; the reward source agreed with "
            f"{report.agreed:,}, {action} {report.flipped:,}, ties {report.ties:,}",
            f"wrote {out / ('data.' + cfg.format)} and {out / 'report.json'}",
        ]
    )
    return result


# --- split ----------------------------------------------------------------------------------


@dataclass
class SplitConfig(WritingConfig):
    """Settings of `preftune data split`."""

    test_fraction: float = arg(
        0.1, "Fraction of prompts (or rows, with --by row) that go to the test side."
    )
    by: str = arg(
        "prompt",
        "Split by prompt (every row of a prompt on one side) or by row.",
        choices=("prompt", "row"),
    )
    seed: int = arg(0, "Seed of the split.")

    command = "split"

    def validate(self) -> None:
        super().validate()
        _require(
            0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "a number in (0, 1)"
        )


def run_split(cfg: SplitConfig) -> dict:
    from preftune.datatools.split import split

    out = _prepare_output(cfg)
    sides, report = split(_open(cfg), test_fraction=cfg.test_fraction, by=cfg.by, seed=cfg.seed)
    with (
        RowWriter(out / f"train.{cfg.format}", cfg.format) as train,
        RowWriter(out / f"test.{cfg.format}", cfg.format) as test,
    ):
        for side, row in progress(sides, desc="split"):
            (test if side == "test" else train).write(row)
    result = {
        **dataclasses.asdict(report),
        "outputs": [f"train.{cfg.format}", f"test.{cfg.format}"],
        "config": dataclasses.asdict(cfg),
    }
    write_report(result, out / "report.json")
    _print(
        [
            f"{report.source}: {report.n_rows:,} rows -> train {report.n_train:,}, test "
            f"{report.n_test:,}"
            + (
                f" ({report.prompts['train']:,} and {report.prompts['test']:,} "
                "distinct prompts, none on both sides)"
                if report.prompts
                else ""
            ),
            f"wrote {out / ('train.' + cfg.format)}, {out / ('test.' + cfg.format)} and "
            f"{out / 'report.json'}",
        ]
    )
    return result


# --- the command group ----------------------------------------------------------------------

# name -> (config class, run function, one-line description)
SUBCOMMANDS = {
    "inspect": (
        InspectConfig,
        run_inspect,
        "Report what is in the data: bad rows, turns, lengths, length bias, duplicates, "
        "margins, subsets, agreement with a reward source.",
    ),
    "dedup": (
        DedupConfig,
        run_dedup,
        "Remove exact and near-duplicate rows (MinHash LSH), keeping the first.",
    ),
    "decontaminate": (
        DecontaminateConfig,
        run_decontaminate,
        "Remove rows sharing a long n-gram with an evaluation set.",
    ),
    "binarize": (
        BinarizeConfig,
        run_binarize,
        "Rated completions (scores or UltraFeedback annotations) -> pairs with a margin.",
    ),
    "relabel": (
        RelabelConfig,
        run_relabel,
        "Reorder every pair as a reward source prefers it (AI feedback), counting flips.",
    ),
    "split": (SplitConfig, run_split, "Train/test split that never puts one prompt on both sides."),
}
DESCRIPTION = (
    "Understand and clean preference data: inspect, dedup, decontaminate, binarize, relabel, split."
)


def run_data(cfg: DataToolConfig) -> dict:
    """Run the `preftune data` command whose config `cfg` is (e.g. an InspectConfig)."""
    for config_cls, run, _ in SUBCOMMANDS.values():
        if type(cfg) is config_cls:
            cfg.validate()
            return run(cfg)
    raise PreftuneError(
        f"run_data: expected the config of a data command "
        f"({', '.join(c.__name__ for c, _, _ in SUBCOMMANDS.values())}), "
        f"got {type(cfg).__name__}"
    )


def build_parser(argv: list[str]):
    """(parser, config class, run function) of `preftune data SUB`; for anything but a known
    SUB, the group's own parser answers (help, or an error naming the subcommands)."""
    if not argv or argv[0] not in SUBCOMMANDS:
        group = argparse.ArgumentParser(
            prog="preftune data",
            description=DESCRIPTION,
            epilog="`preftune data COMMAND --help` lists a command's options; every command "
            "accepts --config FILE.yaml, and flags given on the command line win.",
        )
        subs = group.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
        for name, (_, _, desc) in SUBCOMMANDS.items():
            subs.add_parser(name, help=desc, add_help=False)
        group.parse_args(argv)  # exits: 0 for --help, 2 for a missing or unknown command
        raise AssertionError("unreachable: argparse exits above")
    config_cls, run, desc = SUBCOMMANDS[argv[0]]
    parser = argparse.ArgumentParser(prog=f"preftune data {argv[0]}", description=desc)
    parser.add_argument(
        "data",
        nargs="?",
        metavar="DATA",
        default=argparse.SUPPRESS,
        help="The data (same as --data).",
    )
    add_config_arguments(parser, config_cls)
    return parser, config_cls, run


def main(argv: list[str] | None = None) -> int:
    """`python -m preftune.datatools.cli SUB ...`, the same as `preftune data SUB ...`."""
    from preftune.cli import main as preftune_main

    return preftune_main(["data", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
