"""`preftune <command>`: one typed config per command, YAML and flags on top of it."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import shlex
import sys

from preftune import __version__
from preftune.config import add_config_arguments, build_config
from preftune.errors import PreftuneError

# name -> (module, config class, run function, one-line description)
COMMANDS: dict[str, tuple[str, str, str, str]] = {
    "lab": (
        "preftune.lab.run",
        "LabConfig",
        "run_lab",
        "Compare every method side by side on worlds with a known gold reward.",
    ),
    "sft": (
        "preftune.trainers.sft",
        "SFTConfig",
        "run_sft",
        "Supervised fine-tuning on demonstrations (loss on completion tokens only).",
    ),
    "dpo": (
        "preftune.trainers.dpo",
        "DPOConfig",
        "run_dpo",
        "Direct preference optimisation and its family (IPO, cDPO, SimPO, ORPO, CPO, ...).",
    ),
    "kto": (
        "preftune.trainers.kto",
        "KTOConfig",
        "run_kto",
        "Kahneman-Tversky optimisation on unpaired (or split paired) feedback.",
    ),
    "reward": (
        "preftune.trainers.reward",
        "RewardConfig",
        "run_reward",
        "Train a scalar reward model (Bradley-Terry, margins, Plackett-Luce).",
    ),
    "eval-rm": (
        "preftune.evaluation.eval_rm",
        "EvalRMConfig",
        "run_eval_rm",
        "Evaluate any reward: accuracy with intervals, calibration, length bias.",
    ),
    "ppo": (
        "preftune.trainers.ppo",
        "PPOConfig",
        "run_ppo",
        "Actor-critic PPO against a reward model or reward function.",
    ),
    "grpo": (
        "preftune.trainers.grpo",
        "GRPOConfig",
        "run_grpo",
        "Group-relative policy optimisation (GRPO, Dr. GRPO, DAPO aggregation).",
    ),
    "rloo": (
        "preftune.trainers.rloo",
        "RLOOConfig",
        "run_rloo",
        "REINFORCE with the leave-one-out baseline.",
    ),
    "online-dpo": (
        "preftune.trainers.online_dpo",
        "OnlineDPOConfig",
        "run_online_dpo",
        "Online DPO: sample two completions, rank them by the reward, DPO loss.",
    ),
    "best-of-n": (
        "preftune.trainers.best_of_n",
        "BestOfNConfig",
        "run_best_of_n",
        "Sample N completions per prompt and keep the best by the reward.",
    ),
    "plot": (
        "preftune.engine.curves",
        "PlotConfig",
        "run_plot",
        "Overlay the training curves of one or more runs: preftune plot RUN_DIR [RUN_DIR ...].",
    ),
    # A group: `preftune data SUB ...` takes its parser from SUB (preftune.datatools.cli).
    "data": (
        "preftune.datatools.cli",
        "DataToolConfig",
        "run_data",
        "Understand and clean preference data: inspect, dedup, decontaminate, binarize, "
        "relabel, split.",
    ),
}


def _top_level_help() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: preftune COMMAND [options]   (preftune COMMAND --help for its options)",
        "",
        "Teach language models from preference feedback.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, _, _, desc) in COMMANDS.items()]
    lines += ["", "Every command accepts --config FILE.yaml; flags given on the command line win."]
    return "\n".join(lines)


def build_parser(command: str):
    module_name, config_name, run_name, desc = COMMANDS[command]
    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    parser = argparse.ArgumentParser(prog=f"preftune {command}", description=desc)
    add_config_arguments(parser, config_cls)
    return parser, config_cls, getattr(module, run_name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_level_help())
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"preftune {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(_top_level_help(), file=sys.stderr)
        print(f"\npreftune: error: unknown command {command!r}", file=sys.stderr)
        return 2
    from preftune.engine import preemption, rundir

    config_cls = None
    try:
        with preemption.handling():
            if command == "data":  # a command group: the parser comes from its subcommand
                from preftune.datatools.cli import build_parser as build_data_parser

                parser, config_cls, run = build_data_parser(argv[1:])
                namespace = parser.parse_args(argv[2:])
            else:
                parser, config_cls, run = build_parser(command)
                namespace = parser.parse_args(argv[1:])  # argparse exits 2 on unknown options
            cfg = build_config(config_cls, namespace)
            run(cfg)
    except preemption.Preempted as exc:
        if _is_main_rank():
            how = ""
            if exc.resumable:
                how = (
                    f"; to continue: {_resume_command(argv)}"
                    if "resume" in getattr(config_cls, "__dataclass_fields__", {})
                    else "; run the same command again to continue"
                )
            print(f"preftune {command}: {exc}{how}", file=sys.stderr)
        return exc.exit_code
    except PreftuneError as exc:
        print(f"preftune {command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"preftune {command}: interrupted", file=sys.stderr)
        return 130
    except preemption.StoppedBeforeTraining as exc:
        print(
            f"preftune {command}: stopped by SIGTERM before training started; nothing to "
            "resume, run the same command again",
            file=sys.stderr,
        )
        return exc.exit_code
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" while writing {exc.filename}" if exc.filename else ""
        print(
            f"preftune {command}: error: the disk is full (no space left on device){where}; "
            "free some space and run the command again",
            file=sys.stderr,
        )
        return 2
    finally:
        rundir.release_all()
    return 0


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _resume_command(argv: list[str]) -> str:
    """The command line that continues a stopped run: the same one with --resume."""
    args = [a for a in argv if a not in ("--overwrite", "--no-resume")]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["preftune", *args])


if __name__ == "__main__":
    sys.exit(main())
