"""Judges: a reward for every response of a generations row (the online loop's proxy for a human).

* `RewardModelJudge`: a Bradley–Terry reward model scores each (prompt, response);
* `PreferenceModelJudge`: the pairwise preference model ranks the n responses of a prompt
  (knockout or round robin, `models.ranking`); the rewards are the ranking scores, which is all
  best-vs-worst pair selection needs;
* `FunctionJudge`: a Python function ``name(row, response) -> float`` for verifiable tasks.

A response the judge cannot score (too long for the model, a function that raises or returns
NaN) gets the reward None and a reason in ``errors``; the row is kept, and `pairs` uses
only scored responses.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import reprlib
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from rlhf_workflow.data.schemas import prompt_messages
from rlhf_workflow.errors import UserError, config_key, model_source


@dataclass
class Scores:
    """Per row: one reward per response (None = not scored) and why each unscored one was not."""

    rewards: list[list[float | None]] = field(default_factory=list)
    errors: list[dict[int, str]] = field(default_factory=list)


class Judge(Protocol):
    name: str
    comparisons: int  # pairwise comparisons made so far (0 for judges that score one response at a time)

    def score(self, rows: list[dict[str, Any]]) -> Scores:
        """Rewards for the responses of each generations row."""
        ...


class RewardModelJudge:
    """Scores every response with a reward model; each prompt is computed once for its n responses.

    ``batch_size`` (judge.batch_size, default the scorer's) is the number of responses a forward
    pass reads; a prompt's responses share its computation within a pass."""

    comparisons = 0

    def __init__(self, scorer: Any, name: str = "reward model", *, batch_size: int | None = None):
        self.scorer = scorer
        self.name = name
        self.batch_size = batch_size or scorer.batch_size

    def score(self, rows: list[dict[str, Any]]) -> Scores:
        grouped = self.scorer.score_groups([row["prompt"] for row in rows], [row["responses"] for row in rows],
                                           batch_size=self.batch_size)
        values = iter(v for group in grouped for v in group)
        out = Scores()
        for row in rows:
            rewards: list[float | None] = []
            errors: dict[int, str] = {}
            for index in range(len(row["responses"])):
                value = next(values)
                if value is not None and math.isfinite(value):
                    rewards.append(float(value))
                else:  # marked on the row, so the pairs never see it
                    rewards.append(None)
                    errors[index] = (f"the prompt and response do not fit in {config_key('judge.max_length')} {self.scorer.max_length}"
                                     if value is None else f"the reward model returned {value}")
            out.rewards.append(rewards)
            out.errors.append(errors)
        return out


class PreferenceModelJudge:
    """Ranks the responses of each prompt with a pairwise preference model; rewards = ranking scores."""

    def __init__(self, judge: Any, method: str = "knockout", name: str = "preference model"):
        self.judge = judge
        self.method = method
        self.name = f"{name} ({method})"
        self.comparisons = 0

    def score(self, rows: list[dict[str, Any]]) -> Scores:
        out = Scores()
        for row in rows:
            ranking = self.judge.rank(prompt_messages(row["prompt"]), row["responses"], self.method)
            self.comparisons += ranking.comparisons
            out.rewards.append([float(s) for s in ranking.scores])
            out.errors.append({})
        return out


class _TimedOut(BaseException):
    """Raised into a judge function that ran past its time (a BaseException: its own `except
    Exception` cannot swallow it)."""


def as_reward(value: Any) -> float | str:
    """A judge's return value as a finite float, or why it is not one. Real scalars of any kind count
    (int, float, numpy scalars, a one-element numpy array or torch tensor); bool does not."""
    if isinstance(value, (bool, np_bool_types())):
        return f"returned a bool ({value}), expected a number"
    if not isinstance(value, numbers.Real):
        item, numel = getattr(value, "item", None), getattr(value, "numel", None)
        count = numel() if callable(numel) else getattr(value, "size", None)  # torch: numel(); numpy: .size
        if callable(item) and getattr(value, "shape", None) is not None and count == 1:
            return as_reward(item())
        return f"returned {type(value).__name__} {reprlib.repr(value)}, expected a number"
    try:
        number = float(value)
    except OverflowError:
        return f"returned a number too large for a float ({reprlib.repr(value)})"
    return number if math.isfinite(number) else f"returned {number}"


def _text(exc: BaseException, limit: int = 300) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def np_bool_types() -> tuple[type, ...]:
    numpy = sys.modules.get("numpy")  # a judge returning numpy values has imported it
    return (numpy.bool_,) if numpy is not None else ()


class FunctionJudge:
    """Calls ``function(row, response)`` for every response; it must return a finite number.

    A function that raises is recorded as no reward for that response, with the reason; one that
    runs past ``timeout`` seconds (0 = no limit) too. One that ends the program (``sys.exit``, any
    `BaseException` but KeyboardInterrupt) stops the command with an error naming it.
    """

    comparisons = 0

    def __init__(self, function: Callable[[dict[str, Any], str], Any], name: str, timeout: float = 0.0):
        self.function = function
        self.name = name
        self.timeout = timeout

    def call(self, row: dict[str, Any], response: str) -> float | str:
        """The reward, or why there is none."""
        limited = self.timeout > 0 and threading.current_thread() is threading.main_thread()
        if limited:
            def stop(signum: int, frame: Any) -> None:
                raise _TimedOut()

            previous = signal.signal(signal.SIGALRM, stop)
            signal.setitimer(signal.ITIMER_REAL, self.timeout)
        try:
            value = self.function(row, response)
        except KeyboardInterrupt:
            raise
        except _TimedOut:
            return f"{self.name} took longer than {config_key('judge.timeout')} ({self.timeout:g} s)"
        except Exception as exc:  # a user's function: any failure is reported with the row
            return f"{self.name} raised {type(exc).__name__}: {_text(exc)}"
        except BaseException as exc:  # SystemExit and the like: it tried to end the program
            raise UserError(f"the judge {self.name} raised {type(exc).__name__}({_text(exc)}) on "
                            f"row {row.get('id')!r}: a judge must return a number, not end the program") from None
        finally:
            if limited:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        reward = as_reward(value)
        return reward if isinstance(reward, float) else f"{self.name} {reward}"

    def score(self, rows: list[dict[str, Any]]) -> Scores:
        out = Scores()
        for row in rows:
            rewards: list[float | None] = []
            errors: dict[int, str] = {}
            for index, response in enumerate(row["responses"]):
                value = self.call(row, response)
                if isinstance(value, str):
                    rewards.append(None)
                    errors[index] = value
                else:
                    rewards.append(value)
            out.rewards.append(rewards)
            out.errors.append(errors)
        return out


def load_function(spec: str, key: str = "judge.function") -> Callable[..., Any]:
    """``package.module:name`` or ``path/to/file.py:name`` -> the callable; ``key``: the config key that names
    it, for messages."""
    key = config_key(key)
    location, _, name = spec.rpartition(":")
    if not location or not name:
        raise UserError(f"{key} {spec!r}: expected 'package.module:name' or 'path/to/file.py:name'")
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise UserError(f"{key} {spec!r}: {path} does not exist")
        module_name = f"rlhf_workflow_judge_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        if module_spec is None or module_spec.loader is None:
            raise UserError(f"{key} {spec!r}: cannot load {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            raise UserError(f"{key} {spec!r}: importing {path} failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(location)
        except Exception as exc:
            raise UserError(f"{key} {spec!r}: cannot import {location}: {type(exc).__name__}: {exc}") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise UserError(f"{key} {spec!r}: {location} has no function {name!r}")
    return function


def check_judge(config: Any) -> None:
    """A `UserError` when the judge a `JudgeConfig` describes cannot be had, found without loading a
    model: a function that does not import, a path that holds no model or one of the other type."""
    if config.type == "function":
        load_function(config.function)
        return
    from rlhf_workflow.models.preference import detect_kind

    if not Path(config.path).is_dir():
        raise UserError(f"{config_key('judge.path')} {config.path} is not a directory (expected a model saved by "
                        f"{'train-rm' if config.type == 'reward_model' else 'train-pm'})")
    kind = detect_kind(config.path, hint=f"{config_key('judge.path')} must be a model saved by train-rm or train-pm")
    if kind != {"reward_model": "rm", "preference_model": "pm"}[config.type]:
        found = "a preference model" if kind == "pm" else "a reward model"
        raise UserError(f"{config_key('judge.path')} {config.path} holds {found}; set {config_key('judge.type')}="
                        f"{'preference_model' if kind == 'pm' else 'reward_model'}")


def make_judge(config: Any, *, device: Any = None, chat_template: bool = True) -> Judge:
    """The judge a `JudgeConfig` describes, with its model (if any) on ``device``."""
    if config.type == "function":
        return FunctionJudge(load_function(config.function), config.function, timeout=config.timeout)
    check_judge(config)
    if config.type == "reward_model":
        from rlhf_workflow.models.reward import load_reward_scorer

        with model_source("judge.path"):
            scorer = load_reward_scorer(config.path, dtype=config.dtype, max_length=config.max_length,
                                        chat_template=chat_template, batch_size=config.batch_size)
        if chat_template:
            from rlhf_workflow.data.templating import require_chat_template

            require_chat_template(scorer.tokenizer, "apply_chat_template")
        if device is not None:
            scorer.model.to(device)
        return RewardModelJudge(scorer, f"reward model {config.path}")
    from rlhf_workflow.models.preference import load_preference_judge

    with model_source("judge.path"):
        judge = load_preference_judge(config.path, dtype=config.dtype, batch_size=config.batch_size,
                                      max_length=config.max_length)
    if device is not None:
        judge.model.to(device)
    return PreferenceModelJudge(judge, config.ranking, f"preference model {config.path}")
