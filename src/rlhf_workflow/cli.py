"""`rlhf-workflow`: one entry point, one subcommand per step of the workflow.

    rlhf-workflow sft --config configs/quickstart-sft.yaml train.lr=2e-5

Every command takes ``--config FILE`` (YAML) and any number of dotted ``key=value`` overrides; the
resolved config is saved into the command's output directory. Problems with the user's input are
printed as one sentence (no traceback) and the exit status is 2.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from typing import Callable

from rlhf_workflow import __version__
from rlhf_workflow.errors import UserError

# Override examples per command, each made of keys that command takes (a test holds them to its config)
EXAMPLES = {
    "sft": "train.lr=2e-5 train.per_device_batch_size=4 model.lora.r=16 'train.report_to=[tensorboard]'",
    "train-rm": "train.lr=1e-5 data.max_length=512 model.lora.r=16 loss.center_coef=0.01",
    "train-pm": "train.lr=1e-5 data.max_length=512 format.label_a=A format.label_b=B",
    "dpo": "train.lr=5e-7 loss.beta=0.1 loss.type=ipo data.max_length=1024 model.lora.r=16",
    "generate": "sampling.n=8 sampling.temperature=0.7 backend=vllm vllm.tensor_parallel_size=2",
    "annotate": "judge.type=reward_model judge.path=runs/rm/model length_penalty.coef=0.01",
    "pairs": "strategy=max_random min_margin=0.5",
    "prompts": "task=arithmetic count=200 options.digits=2",
    "eval-rm": "batch_size=16 max_length=512 ranking=knockout",
    "run": "dpo.train.lr=5e-7 generation.sampling.n=8 policy.lora.r=16 judge.path=runs/rm/model",
    "demo": "seed=1 iterations=3 generation.sampling.n=8",
}


# --force means one thing everywhere: start afresh what the given settings change, moving the earlier
# outputs aside (never deleting them)
FORCE_RUN = ("with a changed recipe, redo the stages a changed key feeds and every later one (those before are "
             "kept); their earlier outputs are moved aside into output_dir/replaced-<k>/ (nothing is deleted). Also "
             "starts afresh in an output_dir of another command the same way")


def epilog(command: str) -> str:
    """The lines under a command's --help: how overrides are given, with keys of that command."""
    return (f"overrides: any config key as dotted key=value after the options, e.g.\n  {EXAMPLES[command]}\n"
            "Values are parsed as YAML. Unknown keys and wrong types are errors that name the key.\n"
            "--print-config shows every key with what it means, its type and default.")


def _command_parser(
    sub: argparse._SubParsersAction, name: str, help_text: str, description: str, runner: tuple[str, str], *,
    resumable: bool = True, appends: bool = False,
) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        name, help=help_text, description=description, epilog=epilog(name),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", metavar="FILE", help="YAML config of this command")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML (every key, with what it means) and exit")
    if resumable:
        parser.add_argument("--resume", action="store_true", help="continue this command's run in output_dir (from its "
                            "latest checkpoint)")
        parser.add_argument("--force", action="store_true", help="start afresh in an output_dir that holds a run (of "
                            "this command or another): its files are moved aside into output_dir/replaced-<k>/ "
                            "(nothing is deleted)")
    elif appends:
        parser.add_argument("--force", action="store_true", help="start afresh an output whose rows were made with other "
                            "settings: the old file is moved aside as OUTPUT.bak-<k> (nothing is deleted)")
    parser.set_defaults(run=_command_runner(name, *runner))
    return parser


def build_parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser by name, in the order of `rlhf-workflow --help` (the CLI reference's source)."""
    return dict(_parsers()[1].choices)


def _parsers() -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    parser = argparse.ArgumentParser(
        prog="rlhf-workflow",
        description=(
            "The RLHF Workflow (Dong, Xiong et al., 2024): reward modeling as a proxy for human feedback, "
            "then online iterative DPO. Each subcommand is one step; each reads and writes plain files."
        ),
    )
    parser.add_argument("--version", action="version", version=f"rlhf-workflow {__version__}")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _command_parser(
        sub, "sft", "supervised fine-tuning of a chat model (loss on assistant tokens only)",
        "Supervised fine-tuning: trains on conversations ({'messages': [...]}) or prompt/completion rows "
        "(strings or message lists), with the loss on assistant tokens only. Writes OUTPUT_DIR/model "
        "(safetensors, loadable with AutoModelForCausalLM.from_pretrained), metrics.jsonl, config.yaml "
        "and checkpoints/. Runs on one CPU or GPU, or under `accelerate launch` on several.",
        ("rlhf_workflow.train.sft", "run_sft"),
    )

    _command_parser(
        sub, "train-rm", "train a Bradley-Terry reward model on preference pairs",
        "Bradley-Terry reward model: an LM backbone with a scalar head read at the last real token, "
        "loss -log sigmoid(r_chosen - r_rejected) (optional margin and reward centering). Input: pairs "
        "{prompt, chosen, rejected} as strings or messages. Writes OUTPUT_DIR/model, a sequence-classification "
        "model (safetensors) that AutoModelForSequenceClassification loads. Runs under `accelerate launch` too.",
        ("rlhf_workflow.train.reward", "run_train_rm"),
    )

    _command_parser(
        sub, "train-pm", "train a pairwise preference model that answers 'A' or 'B'",
        "Pairwise preference model: a causal LM reads '[CONTEXT] ... [RESPONSE A] ... [RESPONSE B] ...' and is "
        "trained to answer with the label token of the chosen response (its position randomised per example; "
        "loss on that token only). P(A > B) is the softmax over the two label logits, averaged over both orders "
        "at inference. Writes OUTPUT_DIR/model with its format in preference_model.json. Runs under "
        "`accelerate launch` too.",
        ("rlhf_workflow.train.preference", "run_train_pm"),
    )

    _command_parser(
        sub, "dpo", "align a policy with DPO (or IPO, hinge, robust/conservative DPO, RPO) on preference pairs",
        "Direct preference optimisation: pairs {prompt, chosen, rejected} (strings or messages) in, a policy "
        "out (OUTPUT_DIR/model, safetensors, loadable with AutoModelForCausalLM). Reference log-probs are "
        "computed once before training and written with the pairs to OUTPUT_DIR/train_pairs.ref.jsonl (pairs "
        "that carry ref_chosen_logp / ref_rejected_logp skip that pass). Each pair is one row "
        "[prompt | chosen | rejected], so its prompt is computed once. Runs under `accelerate launch` too.",
        ("rlhf_workflow.train.dpo", "run_dpo"),
    )

    _command_parser(
        sub, "generate", "sample n responses per prompt (hf on CPU/GPU, vLLM, or an OpenAI-compatible server)",
        "Generation: a prompts file {id, prompt, ...} in, a generations file out: each prompt row plus "
        "`responses` (n samples), `response_tokens` and `finish_reasons`. Backends: hf (transformers; CPU or GPU), "
        "vllm (optional extra, GPU), openai (any OpenAI-compatible server). Rows are appended as batches finish "
        "and a rerun skips prompts already in the output. Under `accelerate launch` the prompts are split over "
        "the processes and merged. Prompts that cannot be answered are listed in OUTPUT.errors.jsonl.\n\n"
        "  rlhf-workflow generate prompts=prompts.jsonl output=gen.jsonl sampling.n=4 sampling.max_new_tokens=64",
        ("rlhf_workflow.generate.command", "run_generate"), resumable=False, appends=True,
    )

    _command_parser(
        sub, "annotate", "score every response of a generations file (reward model, preference model or a function)",
        "Annotation: adds `rewards` (one per response) to each generations row, from judge.type=reward_model "
        "(judge.path: a train-rm model), preference_model (judge.path: a train-pm model; the responses of a prompt "
        "are ranked by knockout or round robin and the rewards are the ranking scores) or function "
        "(judge.function: 'module:name' or 'file.py:name', called as name(row, response) -> float). A response "
        "the judge cannot score gets null and a reason in `reward_errors`. length_penalty.coef=λ writes "
        "r - λ·len (raw scores kept in `raw_rewards`). Resumable; splits rows over processes under accelerate launch."
        "\n\n  rlhf-workflow annotate input=gen.jsonl output=scored.jsonl judge.type=reward_model judge.path=runs/rm/model",
        ("rlhf_workflow.online.annotate", "run_annotate"), resumable=False, appends=True,
    )

    _command_parser(
        sub, "pairs", "build preference pairs from annotated generations (best vs worst of n, and others)",
        "Pair selection: for each annotated generations row, a pair {prompt, chosen, rejected, chosen_reward, "
        "rejected_reward} by strategy max_min (best vs worst, the default), max_random, random or max_max (best vs "
        "second best). Ties are dropped, and pairs whose reward gap is not above min_margin. Prints statistics "
        "and writes them to OUTPUT.stats.json.\n\n  rlhf-workflow pairs input=scored.jsonl output=pairs.jsonl",
        ("rlhf_workflow.online.pairs", "run_pairs"), resumable=False,
    )

    _command_parser(
        sub, "prompts", "write a built-in task's prompts (ifeval, instructions, arithmetic) to a file",
        "Prompts of a built-in task with a verifiable judge: `ifeval` (IFEval's schema: instruction_id_list and "
        "kwargs, any of IFEval's 25 instruction types; judge rlhf_workflow.tasks.ifeval:judge, IFEval's own "
        "checkers), `instructions` (the same, restricted to the types the demo's small model follows sometimes; "
        "judge rlhf_workflow.tasks.instructions:judge) or `arithmetic` (`answer`; judge "
        "rlhf_workflow.tasks.arithmetic:judge). The train, dev and eval splits never share a prompt.\n\n"
        "  rlhf-workflow prompts task=instructions split=train count=512 output=train.jsonl",
        ("rlhf_workflow.tasks", "run_make_prompts"), resumable=False,
    )

    run = sub.add_parser(
        "run", help="the online iterative loop (or its offline baseline) from one YAML recipe, then the report",
        description="Online iterative DPO: for t = 1..T, π_{t-1} samples n responses to this iteration's prompts, the "
        "judge scores them, best-vs-worst pairs train π_t by DPO (reference log-probs computed once), and π_t is "
        "evaluated on held-out prompts (proxy reward, gold metric, win rate and KL vs π0, length). Everything goes "
        "into output_dir (state.json, iter_<t>/, metrics.jsonl, report/). Running the same command again continues "
        "an interrupted run where it stopped; a changed recipe is refused unless --force, which redoes the stages the change "
        "reaches. mode=offline trains once on "
        "pairs sampled from π0 (offline.match_run=RUN for the same number of pairs as an online run).\n\n"
        "  rlhf-workflow run configs/demo.yaml\n  rlhf-workflow run configs/demo.yaml mode=offline "
        "output_dir=runs/demo-offline offline.match_run=runs/demo",
        epilog=epilog("run"), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("overrides", nargs="*", metavar="CONFIG.yaml | key=value",
                     help="the recipe (a YAML file) and dotted config overrides")
    run.add_argument("--config", "-c", metavar="FILE", help="the recipe (same as giving it first)")
    run.add_argument("--print-config", action="store_true", help="print the resolved config as YAML (every key, with what it means) and exit")
    run.add_argument("--resume", action="store_true", help="continue the run in output_dir (the default anyway)")
    run.add_argument("--force", action="store_true", help=FORCE_RUN)
    run.set_defaults(run=_run_workflow)

    demo = sub.add_parser(
        "demo", help="the embedded demo: the whole workflow on SmolLM2-135M-Instruct (8-15 minutes on 2 CPU cores)",
        description="Runs the packaged recipe configs/demo.yaml: simulated human feedback on the `instructions` task "
        "trains a reward model, online iterative DPO uses it as the judge, an offline DPO baseline gets the same "
        "number of pairs, and every policy is evaluated on held-out prompts with the gold constraint checker. "
        "Writes runs/demo/ and its report (runs/demo/report/report.html). Rerun to continue after an interruption. "
        "--full runs configs/demo-full.yaml instead: the same recipe with twice the training prompts and 200 eval "
        "prompts instead of 64 (the size of the experiments in docs/results/), into runs/demo-full/.",
        epilog=epilog("demo"), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides of the demo recipe")
    demo.add_argument("--full", action="store_true", help="the full recipe, configs/demo-full.yaml: twice the "
                      "training prompts and 200 eval prompts, the size the experiments of docs/results/ run (about twice as long)")
    demo.add_argument("--force", action="store_true", help=FORCE_RUN)
    demo.set_defaults(run=_demo)

    report = sub.add_parser("report", help="write the Markdown/HTML report with plots of a run directory",
                            description="Reads RUN_DIR/metrics.jsonl (and the pairs files) and writes "
                            "RUN_DIR/report/report.md, report.html and PNG plots.")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.set_defaults(run=_report)

    comparison = sub.add_parser(
        "compare", help="paired comparison of policies on the same eval prompts (pooled over seeds), with plots",
        description="For policies evaluated on the same held-out prompts: the per-prompt paired difference of the "
        "gold score, the proxy reward and the response length against a baseline, with 95 %% bootstrap intervals "
        "and a paired sign-flip permutation p-value. Runs of one recipe that differ only in `seed` are pooled "
        "(prompts x seeds, each seed paired within itself) and each seed's difference is shown too. Give run "
        "directories (every evaluated policy) or RUN/<policy> directories, optionally as NAME=RUN to name the "
        "recipe. Writes OUTPUT/compare.md, compare.html, compare.png and compare.json.\n\n"
        "  rlhf-workflow compare runs/demo\n"
        "  rlhf-workflow compare runs/demo-s0 runs/demo-s1 runs/demo-s2 --baseline offline\n"
        "  rlhf-workflow compare pm=runs/pm-s0 pm=runs/pm-s1 rm=runs/rm-s0 rm=runs/rm-s1 --baseline rm/iter_2",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    comparison.add_argument("runs", nargs="+", metavar="RUN_OR_POLICY", help="run or policy directories ([NAME=]PATH)")
    comparison.add_argument("--baseline", default="iter_0", metavar="NAME", help="what every policy is compared with: a "
                            "policy of each run (iter_0 = π0, the default; offline; iter_2) or RECIPE/POLICY")
    comparison.add_argument("--output", "-o", default="comparison", metavar="DIR", help="where the files go "
                            "(default: ./comparison)")
    comparison.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    comparison.set_defaults(run=_compare)

    _command_parser(
        sub, "eval-rm", "accuracy of a reward or preference model on held-out pairs (RewardBench format too)",
        "Accuracy on held-out pairs (ties count half) for a model saved by train-rm or train-pm (detected from "
        "the directory). Rows with a `subset` field get per-subset accuracy; RewardBench subsets also give the "
        "section scores (Chat, Chat Hard, Safety, Reasoning) weighted as RewardBench does. For a reward model: "
        "mean scores and the correlation of score with response length. Prints a table and writes JSON "
        "(`output`, default DATA.eval.json).\n\n  rlhf-workflow eval-rm model=runs/rm/model data=heldout.jsonl",
        ("rlhf_workflow.eval.reward_eval", "run_eval_rm"), resumable=False,
    )
    return parser, sub


def _command_runner(command: str, module: str, function: str) -> Callable[[argparse.Namespace], None]:
    """Load the command's config (file + overrides), then import and run it."""

    def run(args: argparse.Namespace) -> None:
        import importlib

        from rlhf_workflow.config import COMMAND_CONFIGS, load_config

        if args.print_config:
            _print_config(load_config(COMMAND_CONFIGS[command], args.config, args.overrides, unfinished=True), command)
            return
        config = load_config(COMMAND_CONFIGS[command], args.config, args.overrides)
        runner = getattr(importlib.import_module(module), function)
        options = {name: getattr(args, name) for name in ("resume", "force") if hasattr(args, name)}
        runner(config, **options)

    return run


def _run_workflow(args: argparse.Namespace) -> None:
    from rlhf_workflow.config import RunConfig, load_config

    overrides = list(args.overrides)
    config_path = args.config
    if config_path is None and overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    if args.print_config:
        _print_config(load_config(RunConfig, config_path, overrides, unfinished=True), "run")
        return
    from rlhf_workflow.workflow import run_config, run_workflow

    run_workflow(run_config(config_path, overrides), force=args.force)


def _print_config(config, command: str) -> None:
    """The config as annotated YAML on stdout; the inputs it still lacks are marked in it and listed,
    all of them, on stderr (what `rlhf-workflow COMMAND` would refuse)."""
    from rlhf_workflow.config import annotated_yaml

    print(annotated_yaml(config), end="")
    missing = config.missing()
    if missing:
        keys = " ".join(f"{key}=..." for key, _ in missing)
        print(f"note: to run `rlhf-workflow {command}`, also give {keys} (marked REQUIRED above)", file=sys.stderr)


def _demo(args: argparse.Namespace) -> None:
    from rlhf_workflow.workflow import run_demo

    run_demo(list(args.overrides), force=args.force, full=args.full)


def _report(args: argparse.Namespace) -> None:
    from rlhf_workflow.eval.report import write_report

    path = write_report(args.run_dir)
    print(f"report: {path} and {path.with_suffix('.html')}")


def _compare(args: argparse.Namespace) -> None:
    from rlhf_workflow.eval.compare import run_compare

    if args.bootstrap < 0:
        raise UserError(f"--bootstrap {args.bootstrap}: give 0 (no intervals) or more resamples")
    run_compare(args.runs, args.baseline, args.output, args.bootstrap)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for noisy in ("httpx", "urllib3", "huggingface_hub", "filelock", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:
        # the libraries' bars for loading and writing weights (a second each, a screenful in a log):
        # transformers reads huggingface_hub's switch when it is imported, later
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        logging.getLogger("transformers.modeling_utils").addFilter(_expected_new_head)


def _expected_new_head(record: logging.LogRecord) -> bool:
    """False for transformers' load report when all it reports is a missing classification head: a
    reward model made from a causal LM gets a new scalar head (`score`) by design, which transformers
    reports as a problem ("Consider training on your downstream task") at every start. -v shows it."""
    message = record.getMessage()
    if "LOAD REPORT" not in message:
        return True
    rows = [line.split("|") for line in message.splitlines() if line.count("|") >= 2]
    keys = [(row[0].strip(), row[1].strip()) for row in rows[1:] if row[0].strip() and not row[0].strip().startswith("-")]
    return not keys or not all(key.startswith("score.") and "MISSING" in status for key, status in keys)


def main(argv: list[str] | None = None) -> int:
    """Run one command; the exit status (0, 2 for the user's errors, 130 when interrupted)."""
    try:
        code = _command(argv)
    except BaseException:
        _leave_process_group(clean=False)
        raise
    if _leave_process_group(clean=code == 0):
        # A worker of a multi-process run ends here, skipping the interpreter's teardown: every file
        # is written and closed, and exit-time destructors of torch.distributed's C++ threads have
        # aborted processes whose work was done ("terminate called without an active exception").
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        logging.shutdown()
        os._exit(code)
    return code


def _command(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    _setup_logging(args.verbose)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (OSError, RuntimeError) as exc:
        full = _disk_full(exc)
        if full is not None:
            print(f"error: no space left on the device{full}; free some space and run the same command again "
                  "(files are written atomically or appended row by row, so it continues where it stopped)",
                  file=sys.stderr)
            return 2
        path_error = _path_error(exc)
        if path_error is None:
            raise
        print(f"error: {path_error}", file=sys.stderr)
        return 2
    return 0


def _disk_full(exc: BaseException) -> str | None:
    """' (writing FILE)' or '' when ``exc`` (or what caused it) is a full disk or quota; else None.
    torch and safetensors wrap the OS error in their own exceptions, so the chain is searched."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return f" (writing {seen.filename})" if seen.filename else ""
        if "No space left on device" in str(seen):
            return ""
        seen = seen.__cause__ or seen.__context__
    return None


def _path_error(exc: BaseException) -> str | None:
    """One line for an operating-system error about a path (a read-only or missing directory, an output
    that is a directory, a path through a file, a name too long, ...), found in ``exc`` or what caused
    it; None for any other error, which keeps its traceback (a bug)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.filename is not None and seen.errno is not None:
            name = errno.errorcode.get(seen.errno, str(seen.errno))
            paths = f"{seen.filename}" + (f" -> {seen.filename2}" if seen.filename2 is not None else "")
            return f"{paths}: {seen.strerror or os.strerror(seen.errno)} ({name}); check the path and its permissions"
        seen = seen.__cause__ or seen.__context__
    return None


def _leave_process_group(*, clean: bool) -> bool:
    """Tear down the process group of a multi-process run (True), or do nothing (False: none was
    started). After a command that succeeded on this process, wait for the others first, so that no
    process leaves while another is still inside a collective; after a failure, do not wait (the
    launcher stops the other processes)."""
    torch_distributed = sys.modules.get("torch.distributed")
    if torch_distributed is None or not torch_distributed.is_available() or not torch_distributed.is_initialized():
        return False
    if clean:
        torch_distributed.barrier()
    torch_distributed.destroy_process_group()
    return True


if __name__ == "__main__":
    sys.exit(main())
