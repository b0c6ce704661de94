"""Writes fedllm/data/bundled/quickstart.jsonl: a small Dolly-schema dataset made from our own
templates and word lists (nothing copied from a real dataset).

Every response follows a fixed rule from its instruction and context, short enough that a tiny
random-init model with a byte-level tokenizer learns it in a few hundred steps on CPU. Each
category answers in its own style (a label, a bullet list, key=value pairs, ...), so a split
by category is really non-IID.

    python scripts/make_quickstart_data.py [--out PATH] [--rows-per-category N] [--seed S]
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "fedllm" / "data" / "bundled" / "quickstart.jsonl"

GROUPS = {
    "animal": ["dog", "cat", "horse", "otter", "eagle", "mouse", "tiger", "goat"],
    "fruit": ["apple", "pear", "plum", "mango", "lemon", "peach", "grape", "melon"],
    "color": ["red", "blue", "green", "amber", "violet", "black", "white", "pink"],
    "tool": ["hammer", "saw", "drill", "wrench", "chisel", "file", "ladder", "shovel"],
}
# made-up places, so no answer can come from anything but this file
CAPITALS = {
    "Valoria": "Brinmouth", "Kestria": "Odelford", "Morvana": "Tallis", "Quessa": "Pirnhold",
    "Dravenia": "Solvik", "Ulmark": "Fennrow", "Zantoria": "Corbel", "Eskaly": "Marrowgate",
    "Thelos": "Ivenport", "Brasque": "Lunder", "Norvale": "Gethsby", "Ostrane": "Wickmoor",
    "Pellonia": "Harrowdeep", "Sarvund": "Kelmouth", "Vyrelia": "Dunstow", "Caldora": "Amberlea",
}
CITIES = ["Brinmouth", "Odelford", "Tallis", "Solvik", "Fennrow", "Corbel", "Lunder", "Dunstow"]
NAMES = ["Ada", "Bram", "Cleo", "Dario", "Edda", "Finn", "Greta", "Hugo", "Ines", "Jonas",
         "Kira", "Lars", "Mila", "Nico", "Olga", "Pavel", "Rosa", "Sven", "Tara", "Viktor"]
JOBS = ["baker", "nurse", "pilot", "farmer", "painter", "teacher", "miner", "tailor"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = ["market", "harbor", "bakery", "fair", "mill"]
HOBBIES = ["chess", "sailing", "gardening", "music", "hiking", "cooking", "painting", "reading"]
POSITIVE = ["great", "lovely", "superb", "delightful", "wonderful"]
NEGATIVE = ["awful", "dreadful", "terrible", "nasty", "horrible"]
THINGS = ["soup", "film", "hotel", "concert", "book", "train ride", "bread", "show"]


def open_qa(rng: random.Random) -> tuple[str, str, str]:
    country = rng.choice(sorted(CAPITALS))
    question = rng.choice([
        "What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?",
        "Tell me the capital of {c}.",
    ])
    return question.format(c=country), "", f"The capital of {country} is {CAPITALS[country]}."


def general_qa(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(1, 5)
    items = rng.sample([w for words in GROUPS.values() for w in words], n)
    answer = "There is 1 item." if n == 1 else f"There are {n} items."
    return f"How many items are in this list: {', '.join(items)}?", "", answer


def classification(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        group = rng.choice(sorted(GROUPS))
        word = rng.choice(GROUPS[group])
        question = rng.choice([
            "Is '{w}' an animal, a fruit, a color or a tool?", "Classify '{w}' as animal, fruit, color or tool.",
            "Which kind of thing is '{w}': animal, fruit, color or tool?",
        ])
        return question.format(w=word), "", group
    label, words = rng.choice([("positive", POSITIVE), ("negative", NEGATIVE)])
    first, second = rng.sample(words, 2)
    review = f"The {rng.choice(THINGS)} was {first} and {second}."
    return "Is this review positive or negative?", review, label


def closed_qa(rng: random.Random) -> tuple[str, str, str]:
    name, age, city, job = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES), rng.choice(JOBS)
    context = f"{name} is {age} years old and lives in {city}. {name} works as a {job}."
    question, answer = rng.choice([
        (f"How old is {name}?", f"{name} is {age} years old."),
        (f"Where does {name} live?", f"{name} lives in {city}."),
        (f"What is {name}'s job?", f"{name} is a {job}."),
    ])
    return question, context, answer


def information_extraction(rng: random.Random) -> tuple[str, str, str]:
    order, qty, item = rng.randint(100, 999), rng.randint(2, 9), rng.choice(GROUPS["fruit"] + GROUPS["tool"])
    city, day = rng.choice(CITIES), rng.choice(DAYS)
    context = f"Order {order}: {qty} boxes of {item} shipped to {city} on {day}."
    question, answer = rng.choice([
        ("Extract the city and the day from the order.", f"city={city}; day={day}"),
        ("Extract the item and the quantity from the order.", f"item={item}; qty={qty}"),
        ("Extract the order number and the city.", f"order={order}; city={city}"),
    ])
    return question, context, answer


def summarization(rng: random.Random) -> tuple[str, str, str]:
    name, place, day, item = rng.choice(NAMES), rng.choice(PLACES), rng.choice(DAYS), rng.choice(GROUPS["fruit"])
    context = (
        f"On {day}, {name} walked to the {place}. There {name} bought {rng.randint(2, 9)} "
        f"{item}s. Then {name} went home."
    )
    instruction = rng.choice(["Summarize the text in one sentence.", "Give a one-sentence summary."])
    return instruction, context, f"{name} bought {item}s at the {place}."


def brainstorming(rng: random.Random) -> tuple[str, str, str]:
    group, n = rng.choice(sorted(GROUPS)), rng.randint(2, 5)
    instruction = rng.choice(["List {n} {g}s.", "Give me {n} {g}s.", "Brainstorm {n} {g}s."])
    # the first n of the group's fixed order: the count in the question decides the answer
    return instruction.format(n=n, g=group), "", "\n".join(f"- {w}" for w in GROUPS[group][:n])


def creative_writing(rng: random.Random) -> tuple[str, str, str]:
    if rng.random() < 0.5:
        name, hobby = rng.choice(NAMES), rng.choice(HOBBIES)
        return (
            f"Write a short greeting for {name}, who loves {hobby}.", "",
            f"Dear {name}, may {hobby} bring you joy!",
        )
    color, animal = rng.choice(GROUPS["color"]), rng.choice(GROUPS["animal"])
    return f"Write one line of poetry about a {color} {animal}.", "", f"Oh {color} {animal}, run free and sing!"


CATEGORIES = {
    "open_qa": open_qa, "general_qa": general_qa, "classification": classification, "closed_qa": closed_qa,
    "information_extraction": information_extraction, "summarization": summarization,
    "brainstorming": brainstorming, "creative_writing": creative_writing,
}


def make_rows(rows_per_category: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for category, make in CATEGORIES.items():
        for _ in range(rows_per_category):
            instruction, context, response = make(rng)
            rows.append({"instruction": instruction, "context": context, "response": response, "category": category})
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--rows-per-category", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = make_rows(args.rows_per_category, args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
