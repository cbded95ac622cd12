"""Writes prefs_facts.jsonl and prefs_facts_eval.jsonl: preference pairs labelled by a verifiable rule;
and prompts_facts.jsonl / prompts_facts_eval.jsonl: the first prompts of each, as prompts files
({id, prompt}) for a run (configs/own-data-tiny.yaml).

Each prompt has a checkable answer (a capital city, a sum, the larger of two numbers); the chosen
response states the right answer and the rejected one a wrong answer in the same words, so a reward
or preference model can only separate them by judging correctness, not style or length. The
held-out file uses countries and number pairs that the training file does not.
Run `python examples/make_preference_pairs.py` to regenerate both files.
"""

import json
import random
from pathlib import Path

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Greece": "Athens", "Poland": "Warsaw", "Chile": "Santiago", "Cuba": "Havana", "Ireland": "Dublin",
    "Portugal": "Lisbon", "Austria": "Vienna", "Sweden": "Stockholm", "Finland": "Helsinki", "China": "Beijing",
    "Russia": "Moscow", "India": "New Delhi", "Mexico": "Mexico City", "Argentina": "Buenos Aires",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Turkey": "Ankara", "Iran": "Tehran", "Iraq": "Baghdad",
    "Denmark": "Copenhagen", "Belgium": "Brussels", "Netherlands": "Amsterdam", "Hungary": "Budapest",
    "Romania": "Bucharest", "Ukraine": "Kyiv", "Colombia": "Bogota", "Venezuela": "Caracas",
    "Australia": "Canberra", "Indonesia": "Jakarta", "Philippines": "Manila", "South Korea": "Seoul",
    "Saudi Arabia": "Riyadh", "Morocco": "Rabat", "Nigeria": "Abuja", "Ethiopia": "Addis Ababa",
    "Switzerland": "Bern", "Czech Republic": "Prague", "Brazil": "Brasilia", "Pakistan": "Islamabad",
    "Bangladesh": "Dhaka", "Malaysia": "Kuala Lumpur", "Singapore": "Singapore", "New Zealand": "Wellington",
    "Iceland": "Reykjavik", "Scotland": "Edinburgh", "Wales": "Cardiff", "Jamaica": "Kingston",
    "Ghana": "Accra", "Senegal": "Dakar", "Tunisia": "Tunis",
}


def capital_pairs(countries, rng):
    cities = list(CAPITALS.values())
    for country in countries:
        right = CAPITALS[country]
        wrong = rng.choice([c for c in cities if c != right])
        yield f"What is the capital of {country}?", f"The capital of {country} is {right}.", f"The capital of {country} is {wrong}."


def sum_pairs(pairs, rng):
    for a, b in pairs:
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        yield f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"{a} + {b} = {wrong}."


def larger_pairs(pairs, rng):
    for a, b in pairs:
        big, small = max(a, b), min(a, b)
        yield f"Which number is larger, {a} or {b}?", f"The larger number is {big}.", f"The larger number is {small}."


PROMPTS = {"prompts_facts.jsonl": 64, "prompts_facts_eval.jsonl": 32}  # prompts files for a run, from each split


def main() -> None:
    rng = random.Random(0)
    countries = sorted(CAPITALS)
    rng.shuffle(countries)
    numbers = [(a, b) for a in range(2, 40) for b in range(2, 40) if a != b]
    rng.shuffle(numbers)
    splits = {
        "prefs_facts.jsonl": (countries[:45], numbers[:200], numbers[200:360]),
        "prefs_facts_eval.jsonl": (countries[45:], numbers[360:420], numbers[420:480]),
    }
    folder = Path(__file__).parent
    for name, (held_countries, sums, larger) in splits.items():
        rows = list(capital_pairs(held_countries, rng)) + list(sum_pairs(sums, rng)) + list(larger_pairs(larger, rng))
        rng.shuffle(rows)
        with open(folder / name, "w", encoding="utf-8") as f:
            for i, (prompt, chosen, rejected) in enumerate(rows):
                kind = "capital" if "capital" in prompt else "sum" if "+" in prompt else "larger"
                row = {"id": f"{name.split('.')[0]}-{i}", "prompt": prompt, "chosen": chosen, "rejected": rejected, "subset": kind}
                f.write(json.dumps(row) + "\n")
        prompts_name = name.replace("prefs_", "prompts_")
        with open(folder / prompts_name, "w", encoding="utf-8") as f:
            for i, (prompt, _, _) in enumerate(rows[:PROMPTS[prompts_name]]):
                f.write(json.dumps({"id": f"{prompts_name.split('.')[0]}-{i}", "prompt": prompt}) + "\n")


if __name__ == "__main__":
    main()
