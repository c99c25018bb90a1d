"""`preftune lab`: every method side by side on worlds with a known gold reward.

The runner: it walks the cells of the plan (`lab.plan.cells`) in order, runs each one that has
no result yet (`lab.stages` has the stages as functions), and at the end writes results.json
(`lab.summary`) and the report (`lab.report`, which reads results.json alone).

Every finished cell writes its result JSON atomically under `<output_dir>/cells/`, with a key
that hashes every setting it depends on; a rerun skips cells whose result exists with the same
key, so an interrupted lab resumes where it stopped, and a changed setting reruns exactly the
cells it affects. A cell's trainer output folder is overwritten when the cell runs again.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from preftune.errors import PreftuneError
from preftune.lab import evaluate as ev
from preftune.lab import stages
from preftune.lab.gold import spec as gold_spec
from preftune.lab.methods import INFERENCE, METHODS, OFFLINE
from preftune.lab.plan import Cell, LabConfig, Plan, cells, resolve
from preftune.lab.worlds import get_world
from preftune.utils import atomic_write_json

__all__ = ["LabConfig", "run_lab"]

LAB_FORMAT = 3  # bump when a change makes old cell results incomparable
# How the proxy scores a completion; part of every reward-model key (its results change with it).
PROXY_SCORING = "completion + EOS, as trained"
# Part of every offline cell's key: offline results from before the implicit-reward accuracy
# lack it and rerun (only those cells; the base policies stay cached).
IMPLICIT_REWARD_VERSION = 1
ENSEMBLE_RESULT_VERSION = 2  # bump when the ensemble cell's result fields change
EVAL_SEED = 12345  # the sampling seed of every evaluation: common random numbers across cells

# Rough cost of each kind of cell in seconds on 2 CPU cores, for the ETA before anything ran.
PRIOR_SECONDS = {
    "base": 50.0,
    "data": 4.0,
    "reward_model": 15.0,
    "eval": 3.0,
    "reward_ensemble": 45.0,
    "inference": 20.0,
    "offline": 12.0,
    "online": 25.0,
}


def default_cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "preftune" / "lab"


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """One line per cell on stderr: cell k/N, elapsed time, an ETA, and the stage.

    The ETA prices the cells still to run at the mean measured duration of their kind (or the
    prior guess, scaled by how fast this machine has been so far, for kinds not yet seen).
    """

    def __init__(self, todo: list[str], stream=None):
        self.todo = list(todo)
        self.total = len(todo)
        self.done = 0
        self.start = time.perf_counter()
        self.measured: dict[str, list[float]] = {}
        self.stream = stream or sys.stderr

    def eta(self) -> float:
        spent_prior = sum(PRIOR_SECONDS[k] * len(v) for k, v in self.measured.items())
        spent = sum(sum(v) for v in self.measured.values())
        speed = spent / spent_prior if spent_prior else 1.0
        left = 0.0
        for kind in self.todo:
            seen = self.measured.get(kind)
            left += sum(seen) / len(seen) if seen else PRIOR_SECONDS[kind] * speed
        return left

    def begin(self, kind: str, what: str) -> float:
        elapsed = time.perf_counter() - self.start
        print(
            f"lab [{self.done + 1}/{self.total}] {fmt_time(elapsed)} elapsed, "
            f"~{fmt_time(self.eta())} left | {kind}: {what}",
            file=self.stream,
            flush=True,
        )
        return time.perf_counter()

    def end(self, kind: str, t0: float) -> None:
        self.measured.setdefault(kind, []).append(time.perf_counter() - t0)
        if kind in self.todo:
            self.todo.remove(kind)
        self.done += 1


def run_lab(cfg: LabConfig) -> dict:
    import torch
    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    # The lab's own progress line is the output; the trainers' output goes to each cell's log.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return _run_lab(cfg)
    finally:
        torch.set_num_threads(threads)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _run_lab(cfg: LabConfig) -> dict:
    from preftune.lab import report, summary

    plan = resolve(cfg)
    out = Path(cfg.output_dir)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "lab_config.json", {"config": asdict(cfg), "plan": asdict(plan)})
    for m, why in plan.left_out.items():
        print(f"lab: {m} is left out: {why}", file=sys.stderr)

    todo_cells = cells(plan)
    runner = Runner(plan, out, cache_dir)
    todo = [c.kind for c in todo_cells if cfg.restart or not runner.finished(c)]
    progress = Progress(todo)
    failures: list[dict] = []
    for cell in todo_cells:
        if not cfg.restart and runner.finished(cell):
            continue
        t0 = progress.begin(cell.kind, cell.describe())
        try:
            runner.run(cell)
        except (KeyboardInterrupt, PreftuneError):
            raise
        except Exception as exc:  # a bug in one method must not lose the other cells
            log = runner.log_path(cell)
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as f:
                traceback.print_exc(file=f)
            failures.append(
                {"cell": cell.describe(), "error": f"{type(exc).__name__}: {exc}", "log": str(log)}
            )
            print(
                f"lab: FAILED {cell.describe()}: {type(exc).__name__}: {exc} (log: {log})",
                file=sys.stderr,
                flush=True,
            )
        progress.end(cell.kind, t0)

    raw = runner.collect(
        todo_cells, failures, cfg, wall_time_s=time.perf_counter() - progress.start
    )
    results = summary.summarize(raw)
    atomic_write_json(out / "results.json", results)
    report.write_report(out / "results.json", out)
    print(
        f"lab: done in {fmt_time(time.perf_counter() - progress.start)}; report in "
        f"{out / 'report.md'}",
        file=sys.stderr,
        flush=True,
    )
    if failures:
        raise PreftuneError(
            f"{len(failures)} lab cell(s) failed (the report covers the rest; "
            "rerun to retry only them): "
            + "; ".join(f"{f['cell']}: {f['error']} (log {f['log']})" for f in failures)
        )
    return results


class Runner:
    """Runs cells and knows where their results live."""

    def __init__(self, plan: Plan, out: Path, cache_dir: Path):
        self.plan, self.out, self.cache_dir = plan, out, cache_dir
        self._models: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._proxies: dict[tuple, Any] = {}
        self._prompts: dict[tuple[str, int], dict[str, ev.PromptSet]] = {}
        self._gold_pairs: dict[tuple[str, int], tuple] = {}

    # --- where things are ---------------------------------------------------------------------

    def result_path(self, cell: Cell) -> Path:
        return self.out / "cells" / cell.group / f"{cell.name}.json"

    def run_dir(self, cell: Cell) -> Path:
        return self.out / "runs" / cell.group / cell.name

    def data_dir(self, world: str, seed: int, noise: str) -> Path:
        return self.out / "data" / world / f"seed{seed}" / f"noise-{noise}"

    def rm_dir(self, world: str, seed: int, noise: str) -> Path:
        return (
            self.out
            / "runs"
            / Cell("reward_model", world, seed, noise=noise).group
            / "reward_model"
        )

    def ensemble_dir(self, world: str, seed: int, noise: str) -> Path:
        return (
            self.out
            / "runs"
            / Cell("reward_ensemble", world, seed, noise=noise).group
            / "reward_ensemble"
        )

    def log_path(self, cell: Cell) -> Path:
        return self.out / "logs" / cell.group / f"{cell.name}.log"

    def base_path(self, world: str, seed: int) -> Path:
        return self.cache_dir / f"base-{world}-{self.base_key(world, seed)}"

    # --- keys: a hash of everything a cell's result depends on -------------------------------

    def base_key(self, world: str, seed: int) -> str:
        return stages.hash_of(stages.base_settings(self.plan, world, seed, LAB_FORMAT))

    def eval_key(self, world: str, seed: int) -> str:
        return stages.hash_of(
            {"base": self.base_key(world, seed), "seed": EVAL_SEED, "n": self.plan.eval_prompts}
        )

    def data_key(self, world: str, seed: int, noise: str) -> str:
        return stages.hash_of(
            {"base": self.base_key(world, seed), "pairs": self.plan.pairs, "noise": noise}
        )

    def reward_key(self, world: str, seed: int, noise: str) -> str:
        return stages.hash_of(
            {
                "data": self.data_key(world, seed, noise),
                "eval": self.eval_key(world, seed),
                "scoring": PROXY_SCORING,
                "settings": stages.reward_settings(self.plan, seed),
            }
        )

    def ensemble_key(self, world: str, seed: int, noise: str) -> str:
        return stages.hash_of(
            {
                "data": self.data_key(world, seed, noise),
                "eval": self.eval_key(world, seed),
                "scoring": PROXY_SCORING,
                "settings": stages.ensemble_settings(self.plan, seed),
                "result": ENSEMBLE_RESULT_VERSION,
                "aggs": sorted(
                    {METHODS[m].ensemble_agg for m in self.plan.methods if METHODS[m].ensemble}
                ),
            }
        )

    def key(self, cell: Cell) -> str:
        w, s, n = cell.world, cell.seed, cell.noise
        if cell.kind == "base":
            return self.base_key(w, s)
        if cell.kind == "eval":
            return self.eval_key(w, s)
        if cell.kind == "data":
            return self.data_key(w, s, n)
        if cell.kind == "reward_model":
            return self.reward_key(w, s, n)
        if cell.kind == "reward_ensemble":
            return self.ensemble_key(w, s, n)
        parts: dict[str, Any] = {"eval": self.eval_key(w, s), "method": cell.method}
        if cell.kind == INFERENCE:
            parts.update(
                rms=[self.reward_key(w, s, x) for x in self.plan.noises], ns=self._bon_ns()
            )
            if "best_of_n_ensemble" in self.plan.methods:
                parts["ensembles"] = [self.ensemble_key(w, s, x) for x in self.plan.noises]
        else:
            m = METHODS[cell.method]
            parts["settings"] = stages.method_settings(
                self.plan, cell.method, cell.value, cell.lr, s, n, get_world(w)
            )
            parts["steps"] = (
                self.plan.offline_steps if m.kind == OFFLINE else self.plan.online_steps,
                self.plan.eval_points,
            )
            if m.implicit_reward:  # results with the implicit-reward accuracy (issue 9)
                parts["implicit_reward"] = IMPLICIT_REWARD_VERSION
            if n is not None:
                parts["data"] = self.data_key(w, s, n)
                # the proxy column, or the reward
                parts["rm"] = self.ensemble_key(w, s, n) if m.ensemble else self.reward_key(w, s, n)
        return stages.hash_of(parts)

    def _bon_ns(self) -> list[int]:
        ns = set()
        for m in ("best_of_n", "best_of_n_gold", "best_of_n_ensemble"):
            ns.update(int(v) for v in self.plan.sweeps.get(m, []))
        return sorted(ns)

    def finished(self, cell: Cell) -> bool:
        path = self.result_path(cell)
        if not path.is_file():
            return False
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            return False
        if saved.get("key") != self.key(cell):
            return False
        if cell.kind == "base":  # the cache may have been cleared since
            return (self.base_path(cell.world, cell.seed) / "lab_base.json").is_file()
        return True

    # --- shared models ----------------------------------------------------------------------

    def base(self, world: str, seed: int):
        if (world, seed) not in self._models:
            from preftune.models import load_causal_lm

            path = self.base_path(world, seed)
            if not (path / "lab_base.json").is_file():
                stages.train_base_policy(
                    stages.base_settings(self.plan, world, seed, LAB_FORMAT),
                    get_world(world),
                    path,
                    self.out / "logs" / world / f"seed{seed}" / "base.log",
                )
            self._models[(world, seed)] = load_causal_lm(str(path))
        return self._models[(world, seed)]

    def prompt_sets(self, world: str, seed: int) -> dict[str, ev.PromptSet]:
        if (world, seed) not in self._prompts:
            _, tokenizer = self.base(world, seed)
            self._prompts[(world, seed)] = stages.eval_prompt_sets(
                get_world(world), seed, self.plan.eval_prompts, tokenizer
            )
        return self._prompts[(world, seed)]

    def proxy(self, world: str, seed: int, noise: str | None, ensemble: str = ""):
        """The reward model of (world, seed, noise); with `ensemble` (an ensemble method's
        name) the ensemble's reward aggregated as that method optimises it."""
        if noise is None:
            return None
        if ensemble:
            agg, coef = METHODS[ensemble].ensemble_agg
            key = (world, seed, noise, agg, coef)
            if key not in self._proxies:
                from preftune.rewards.sources import EnsembleReward

                self._proxies[key] = EnsembleReward.from_folder(
                    str(self.ensemble_dir(world, seed, noise)),
                    agg=agg,
                    coef=coef,
                    batch_size=64,
                    max_length=stages.MAX_LENGTH,
                )
            return self._proxies[key]
        if not any(
            METHODS[m].uses_reward_model and not METHODS[m].ensemble for m in self.plan.methods
        ):
            return None  # no single reward model is trained (e.g. offline methods only)
        if (world, seed, noise) not in self._proxies:
            from preftune.rewards import ModelReward

            self._proxies[(world, seed, noise)] = ModelReward.from_pretrained(
                str(self.rm_dir(world, seed, noise)), batch_size=64, max_length=stages.MAX_LENGTH
            )
        return self._proxies[(world, seed, noise)]

    def gold_pairs(self, world: str, seed: int):
        """Fresh gold-ranked test pairs: two base-policy samples per test prompt (rows 2i and
        2i+1), sampled with a fixed seed: (rollout, prompts, texts, gold). The reward models'
        and the offline policies' gold accuracies are measured on these same pairs."""
        if (world, seed) not in self._gold_pairs:
            base, tokenizer = self.base(world, seed)
            test = self.prompt_sets(world, seed)["test"]
            rollout, texts = ev.sample(
                base,
                tokenizer,
                test.prompt_ids,
                get_world(world).max_new_tokens,
                EVAL_SEED + 2,
                num_samples=2,
            )
            prompts = [p for p in test.prompts for _ in range(2)]
            self._gold_pairs[(world, seed)] = (
                rollout,
                prompts,
                texts,
                get_world(world).gold_reward(prompts, texts),
            )
        return self._gold_pairs[(world, seed)]

    def _load_result(self, cell: Cell) -> dict:
        return json.loads(self.result_path(cell).read_text())

    # --- running one cell ---------------------------------------------------------------------

    def run(self, cell: Cell) -> None:
        world = get_world(cell.world)
        result: dict[str, Any] = {"key": self.key(cell), **asdict(cell)}
        if cell.kind == "base":
            self.base(cell.world, cell.seed)
            path = self.base_path(cell.world, cell.seed)
            result.update(path=str(path), **json.loads((path / "lab_base.json").read_text()))
            split = stages.prompt_split(world, cell.seed)
            result["prompts"] = {
                "train": len(split.train),
                "validation": len(split.validation),
                "test": len(split.test),
                "test_seen": len(split.test_seen),
                "test_unseen": len(split.test_unseen),
                "overlap": split.overlap(),
            }
        elif cell.kind == "eval":
            model, tokenizer = self.base(cell.world, cell.seed)
            for part, ps in self.prompt_sets(cell.world, cell.seed).items():
                result[part] = ev.evaluate_policy(
                    model, model, tokenizer, world, ps, None, seed=EVAL_SEED, keep_texts=True
                )
        elif cell.kind == "data":
            model, tokenizer = self.base(cell.world, cell.seed)
            result.update(
                stages.make_data(
                    self.plan,
                    world,
                    cell.seed,
                    cell.noise,
                    model,
                    tokenizer,
                    self.data_dir(cell.world, cell.seed, cell.noise),
                )
            )
        elif cell.kind == "reward_model":
            result.update(self._train_reward_model(cell, world))
        elif cell.kind == "reward_ensemble":
            result.update(self._train_reward_ensemble(cell))
        elif cell.kind == INFERENCE:
            result.update(self._best_of_n(cell, world))
        else:
            result.update(self._train_and_evaluate(cell, world))
        atomic_write_json(self.result_path(cell), result)

    def _train_reward_model(self, cell: Cell, world) -> dict:
        run_dir = self.rm_dir(cell.world, cell.seed, cell.noise)
        config_cls, run = stages.trainer("reward")
        settings = stages.reward_settings(self.plan, cell.seed)
        cfg = config_cls(
            model=str(self.base_path(cell.world, cell.seed)),
            data=str(self.data_dir(cell.world, cell.seed, cell.noise) / "pairs.jsonl"),
            output_dir=str(run_dir),
            **settings,
        )
        cfg.validate()
        self._proxies.pop((cell.world, cell.seed, cell.noise), None)
        t0 = time.perf_counter()
        with stages.captured_output(self.log_path(cell)):
            metrics = run(cfg)
        wall = time.perf_counter() - t0
        proxy = self.proxy(cell.world, cell.seed, cell.noise)
        # How often the reward model orders two fresh base samples of a test prompt the way the
        # gold reward does (pairs with equal gold left out, and counted).
        _, prompts, texts, gold = self.gold_pairs(cell.world, cell.seed)
        accuracy, decided = ev.gold_order_accuracy(gold, proxy(prompts, texts).tolist())
        # The base policy's proxy reward on its own evaluation samples: the zero of the proxy.
        base_eval = self._load_result(Cell("eval", cell.world, cell.seed, "base_policy"))
        base_proxy = {
            part: float(
                proxy(
                    self.prompt_sets(cell.world, cell.seed)[part].prompts, base_eval[part]["texts"]
                ).mean()
            )
            for part in ("validation", "test")
        }
        return {
            "settings": settings,
            "metrics": metrics,
            "heldout_accuracy": metrics.get("eval/accuracy"),
            "heldout_loss": metrics.get("eval/loss"),
            "best_step": metrics.get("early_stopping/best_step"),
            "stopped_step": metrics.get("early_stopping/stopped_step"),
            "gold_accuracy": accuracy,
            "gold_accuracy_pairs": decided,
            "gold_ties": len(gold) // 2 - decided,
            "base_proxy": base_proxy,
            "wall_time_s": wall,
            "tokens_trained": stages.tokens_trained(run_dir),
        }

    def _train_reward_ensemble(self, cell: Cell) -> dict:
        """K reward models (seeds seed..seed+K-1) into one ensemble folder; its gold accuracy
        on the same fresh pairs as the single reward model, per member and aggregated the way
        each ensemble method optimises it; the cost of all K members."""
        run_dir = self.ensemble_dir(cell.world, cell.seed, cell.noise)
        config_cls, run = stages.trainer("reward")
        settings = stages.ensemble_settings(self.plan, cell.seed)
        cfg = config_cls(
            model=str(self.base_path(cell.world, cell.seed)),
            data=str(self.data_dir(cell.world, cell.seed, cell.noise) / "pairs.jsonl"),
            output_dir=str(run_dir),
            **settings,
        )
        cfg.validate()
        shutil.rmtree(run_dir, ignore_errors=True)
        for key in [
            k for k in self._proxies if k[:3] == (cell.world, cell.seed, cell.noise) and len(k) > 3
        ]:
            del self._proxies[key]
        t0 = time.perf_counter()
        with stages.captured_output(self.log_path(cell)):
            metrics = run(cfg)
        wall = time.perf_counter() - t0
        _, prompts, texts, gold = self.gold_pairs(cell.world, cell.seed)
        base_eval = self._load_result(Cell("eval", cell.world, cell.seed, "base_policy"))
        sets = self.prompt_sets(cell.world, cell.seed)
        aggregated, base_proxy, members = {}, {}, []
        for m in self.plan.methods:
            if not METHODS[m].ensemble:
                continue
            proxy = self.proxy(cell.world, cell.seed, cell.noise, ensemble=m)
            agg = ensemble_agg_name(m)
            aggregated[agg] = ev.gold_order_accuracy(gold, proxy(prompts, texts).tolist())[0]
            base_proxy[agg] = {
                part: float(proxy(sets[part].prompts, base_eval[part]["texts"]).mean())
                for part in ("validation", "test")
            }
            members = proxy.members
        decided = sum(gold[i] != gold[i + 1] for i in range(0, len(gold), 2))
        member_accuracy = [
            ev.gold_order_accuracy(gold, m(prompts, texts).tolist())[0] for m in members
        ]
        member_dirs = sorted(run_dir.glob("member-*"))
        return {
            "settings": settings,
            "metrics": metrics,
            "members": len(member_dirs),
            "gold_accuracy_members": member_accuracy,
            "gold_accuracy_aggregated": aggregated,
            "gold_accuracy_pairs": decided,
            "heldout_accuracy": [r.get("eval/accuracy") for r in metrics["members"]],
            "best_step": [r.get("early_stopping/best_step") for r in metrics["members"]],
            "base_proxy_by_agg": base_proxy,
            "wall_time_s": wall,
            # the cost of every member: the ensemble method pays for all K
            "tokens_trained": sum(stages.tokens_trained(d) for d in member_dirs),
        }

    def _best_of_n(self, cell: Cell, world) -> dict:
        base, tokenizer = self.base(cell.world, cell.seed)
        ns = self._bon_ns()
        out: dict[str, Any] = {"ns": ns, "points": {}}
        for part, ps in self.prompt_sets(cell.world, cell.seed).items():
            samples = ev.sample_best_of_n(base, tokenizer, world, ps, max(ns), seed=EVAL_SEED + 1)
            prompts = [p for p in ps.prompts for _ in range(samples.m)]
            by = {}
            if "best_of_n_gold" in self.plan.methods:
                by["gold"] = ev.best_of_n(samples, samples.gold, ns, None)
            if "best_of_n" in self.plan.methods:
                for noise in self.plan.noises:
                    scores = self.proxy(cell.world, cell.seed, noise)(
                        prompts, samples.texts
                    ).tolist()
                    by[noise] = ev.best_of_n(samples, scores, ns, scores)
            if "best_of_n_ensemble" in self.plan.methods:
                for noise in self.plan.noises:
                    scores = self.proxy(
                        cell.world, cell.seed, noise, ensemble="best_of_n_ensemble"
                    )(prompts, samples.texts).tolist()
                    by[f"ensemble:{noise}"] = ev.best_of_n(samples, scores, ns, scores)
            out["points"][part] = by
        return out

    def trainer_config(self, cell: Cell):
        """The trainer config of a method cell (not yet validated): the lab's settings plus the
        paths of the base policy, the data and the reward (model, ensemble or gold)."""
        m = METHODS[cell.method]
        world = get_world(cell.world)
        run_dir = self.run_dir(cell)
        settings = stages.method_settings(
            self.plan, cell.method, cell.value, cell.lr, cell.seed, cell.noise, world
        )
        paths: dict[str, Any] = {
            "model": str(self.base_path(cell.world, cell.seed)),
            "output_dir": str(run_dir),
        }
        if m.kind == OFFLINE:
            paths["data"] = str(self.data_dir(cell.world, cell.seed, cell.noise) / "pairs.jsonl")
        else:
            # Online methods sample on training prompts; the oracle controls use the first
            # noise setting's prompt file (the prompts do not depend on the labels).
            noise = cell.noise or self.plan.noises[0]
            paths["data"] = str(self.data_dir(cell.world, cell.seed, noise) / "prompts.jsonl")
            if m.reward == "gold":
                paths["reward_fn"] = [gold_spec(cell.world)]
            elif m.ensemble:
                paths["reward_model"] = str(self.ensemble_dir(cell.world, cell.seed, cell.noise))
            else:
                paths["reward_model"] = str(self.rm_dir(cell.world, cell.seed, cell.noise))
        config_cls, _ = stages.trainer(cell.method)
        return config_cls(**paths, **settings)

    def _train_and_evaluate(self, cell: Cell, world) -> dict:
        from preftune.models import load_causal_lm

        m = METHODS[cell.method]
        run_dir = self.run_dir(cell)
        cfg = self.trainer_config(cell)
        settings = stages.method_settings(
            self.plan, cell.method, cell.value, cell.lr, cell.seed, cell.noise, world
        )
        if not Path(cfg.data).is_file():
            # The oracle controls need only the prompts file, which the data stage writes.
            raise RuntimeError(f"{cfg.data} is missing: its data cell did not run")
        _, run = stages.trainer(cell.method)
        cfg.validate()
        t0 = time.perf_counter()
        with stages.captured_output(self.log_path(cell)):
            metrics = run(cfg)
        wall = time.perf_counter() - t0

        train: dict[str, Any] = {"wall_time_s": wall, "metrics": metrics}
        if m.kind == OFFLINE:
            train["tokens_trained"] = stages.tokens_trained(run_dir)
            train["tokens_generated"] = 0
            train["logps"] = _logp_trend(run_dir)
        else:
            rows = cfg.max_steps * cfg.prompts_per_step * cfg.num_generations
            length = float(metrics.get("completion/length", 0.0))
            passes = getattr(cfg, "ppo_epochs", 1)
            train["tokens_generated"] = int(round(rows * length))
            # Estimate: rows x (prompt ~ 20 tokens + mean completion length) x passes.
            train["tokens_trained"] = int(round(rows * (20 + length) * passes))

        policy, _ = load_causal_lm(str(run_dir))
        base, tokenizer = self.base(cell.world, cell.seed)
        sets = self.prompt_sets(cell.world, cell.seed)
        # The proxy column: the reward the method optimises (for an ensemble method, the
        # ensemble aggregated as it optimises it).
        proxy = self.proxy(
            cell.world, cell.seed, cell.noise, ensemble=cell.method if m.ensemble else ""
        )
        trajectory = []
        t_eval = time.perf_counter()
        for step, folder in stages.checkpoints(run_dir):
            stages.load_checkpoint_weights(policy, folder)
            point = ev.evaluate_policy(
                policy, base, tokenizer, world, sets["validation"], proxy, seed=EVAL_SEED
            )
            trajectory.append({"step": step, **_point(point)})
        final, _ = load_causal_lm(str(run_dir))
        point = ev.evaluate_policy(
            final, base, tokenizer, world, sets["validation"], proxy, seed=EVAL_SEED
        )
        trajectory.append({"step": cfg.max_steps, **_point(point)})
        test = ev.evaluate_policy(
            final, base, tokenizer, world, sets["test"], proxy, seed=EVAL_SEED
        )
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        out = {
            "knob": m.knob,
            "settings": settings,
            "train": train,
            "validation": trajectory[-1],
            "test": test,
            "trajectory": trajectory,
        }
        if m.implicit_reward:
            # Issue 9 req. 4: does the policy's own implicit reward order the fresh gold-ranked
            # test pairs (those the reward model is measured on) the way the gold reward does?
            rollout, _, _, gold = self.gold_pairs(cell.world, cell.seed)
            scores = ev.implicit_rewards(
                final, base, rollout, tokenizer.pad_token_id, float(cell.value), m.implicit_reward
            )
            accuracy, decided = ev.gold_order_accuracy(gold, scores)
            out.update(
                implicit_reward_gold_accuracy=accuracy,
                implicit_reward_gold_pairs=decided,
                implicit_reward=m.implicit_reward,
            )
        out["eval_time_s"] = time.perf_counter() - t_eval
        return out

    # --- collecting the results ---------------------------------------------------------------

    def collect(
        self, all_cells: list[Cell], failures: list[dict], cfg: LabConfig, wall_time_s: float
    ) -> dict:
        import platform
        import resource

        import torch

        usage = resource.getrusage(resource.RUSAGE_SELF)
        finished = []
        for cell in all_cells:
            if self.finished(cell):
                r = self._load_result(cell)
                if cell.kind == "eval":  # the texts served the reward models; not a result
                    for part in ("validation", "test"):
                        r[part].pop("texts", None)
                finished.append(r)
        return {
            "lab_format": LAB_FORMAT,
            "config": asdict(cfg),
            "plan": asdict(self.plan),
            "worlds": {name: get_world(name).description for name in self.plan.worlds},
            "methods": {
                m: {
                    "label": METHODS[m].label,
                    "kind": METHODS[m].kind,
                    "knob": METHODS[m].knob,
                    "reward": METHODS[m].reward,
                    "uses_reward_model": METHODS[m].uses_reward_model,
                    "oracle_of": METHODS[m].oracle_of,
                    "ensemble": METHODS[m].ensemble,
                    "variant_of": METHODS[m].variant_of,
                    "ensemble_agg": ensemble_agg_name(m) if METHODS[m].ensemble else "",
                }
                for m in self.plan.methods
            },
            "eval_seed": EVAL_SEED,
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg()[0],
            },
            "wall_time_s": wall_time_s,
            # CPU time of this process (user + system): what the run costs on a quiet machine,
            # where with one torch thread the wall time would be about this.
            "cpu_time_s": usage.ru_utime + usage.ru_stime,
            "cells": finished,
            "failures": failures,
        }


def ensemble_agg_name(method: str) -> str:
    """`mean-minus-std:1`: an ensemble method's aggregation and coefficient, the key of the
    ensemble cell's per-aggregation results."""
    return "{}:{:g}".format(*METHODS[method].ensemble_agg)


def _point(e: dict) -> dict:
    keys = ("gold", "proxy", "kl_k1", "kl_k1_se", "kl_k3", "kl_k3_se", "length")
    return {k: e[k] for k in keys if k in e}


def _logp_trend(run_dir: Path) -> list[dict]:
    """Chosen and rejected log-probs of the training batches at every logging step (the
    likelihood-displacement trend: both falling means probability mass left both)."""
    path = run_dir / "metrics.jsonl"
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if "logps/chosen" in rec:
                out.append(
                    {
                        "step": rec["step"],
                        "chosen": rec["logps/chosen"],
                        "rejected": rec.get("logps/rejected"),
                    }
                )
    return out
