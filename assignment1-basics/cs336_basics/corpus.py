"""A procedurally generated corpus of short children's stories, so the quickstart needs no download.

The grammar is small but has enough structure (characters recur, pronouns agree, events follow a plot) that
a tiny model's loss falls visibly and its samples become readable within a minute of CPU training.
"""

import random

from cs336_basics.cli_support import atomic_write

NAMES = {"she": ["Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Zoe", "Kim"],
         "he": ["Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Bob"]}
ANIMALS = ["cat", "dog", "bunny", "bird", "frog", "bear", "duck", "fox", "mouse", "puppy"]
ADJECTIVES = ["little", "happy", "small", "brave", "kind", "curious", "silly", "shy", "big", "friendly"]
PLACES = ["a small house", "a big forest", "a quiet town", "a sunny farm", "a green park", "a tall tree",
          "a cozy cave", "a busy village"]
OBJECTS = ["ball", "kite", "box", "book", "hat", "flower", "cake", "toy car", "red balloon", "shiny stone"]
FEELINGS = ["happy", "sad", "scared", "excited", "surprised", "proud", "tired", "angry"]
FRIENDS = ["mom", "dad", "friend", "sister", "brother", "grandma", "teacher"]
WEATHER = ["The sun was shining.", "It was a rainy day.", "The wind was blowing.", "It was a warm day.",
           "Snow was falling outside."]


def _story(rng: random.Random) -> str:
    pronoun = rng.choice(["she", "he"])
    possessive = "her" if pronoun == "she" else "his"
    name = rng.choice(NAMES[pronoun])
    animal, adjective = rng.choice(ANIMALS), rng.choice(ADJECTIVES)
    thing, friend, place = rng.choice(OBJECTS), rng.choice(FRIENDS), rng.choice(PLACES)
    They = pronoun.capitalize()
    opening = rng.choice([
        f"Once upon a time, there was a {adjective} {animal} named {name}.",
        f"One day, a {adjective} {animal} named {name} woke up early.",
        f"There was once a {adjective} {animal} called {name}.",
    ])
    setting = rng.choice([f"{name} lived in {place}.", f"{They} lived with {possessive} {friend} in {place}."])
    problem = rng.choice([
        f"One day, {name} lost {possessive} {thing}. {They} looked everywhere, but {pronoun} could not find it.",
        f"{name} wanted to play with a {thing}, but it was too high to reach.",
        f"{name} found a {thing} under a tree. {They} did not know who it belonged to.",
        f"{name} saw that {possessive} {friend} was {rng.choice(['sad', 'tired', 'scared'])}.",
    ])
    feeling = rng.choice(FEELINGS)
    middle = rng.choice([
        f"{name} felt {feeling}. {They} asked {possessive} {friend} for help.",
        f"{name} thought for a while. Then {pronoun} had an idea.",
        f"{They} said, \"I will not give up!\" {They} tried again and again.",
    ])
    resolution = rng.choice([
        f"Together they found the {thing} behind a big rock. {name} smiled.",
        f"{name} shared the {thing} with {possessive} {friend}, and they played all day.",
        f"In the end, {name} gave the {thing} back, and everyone was happy.",
        f"{possessive.capitalize()} {friend} gave {name} a big hug. {name} felt {rng.choice(['happy', 'proud'])}.",
    ])
    moral = rng.choice(["", "", f" {name} learned that it is good to help others.",
                        f" From that day on, {name} always took care of {possessive} {thing}."])
    sentences = [opening, setting]
    if rng.random() < 0.4:
        sentences.append(rng.choice(WEATHER))
    sentences += [problem, middle, resolution]
    return " ".join(sentences) + moral


def generate_stories(num_stories: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [_story(rng) for _ in range(num_stories)]


def write_corpus(path: str, num_stories: int, seed: int = 0, separator: str = "<|endoftext|>") -> int:
    """Writes stories separated by `separator` lines; returns the number of bytes written."""
    text = "\n".join(story + "\n" + separator for story in generate_stories(num_stories, seed)) + "\n"
    data = text.encode("utf-8")
    with atomic_write(path, "wb") as f:
        f.write(data)
    return len(data)


def prepare_encoded_corpus(data_dir: str, num_stories: int, vocab_size: int, workers: int | None = None,
                           keep_text: bool = True) -> dict:
    """Generated stories (train: seed 0; val: a twentieth as many, at least 50, seed 1), a BPE of at most
    `vocab_size` tokens trained on the train split (saved in data_dir/tokenizer) and both splits encoded to
    data_dir/{train,val}.npy: what the GPU benchmarks train on where nothing can be downloaded. Torch-free.

    Returns the paths (`train_data`, `val_data`), token counts and the BPE's actual vocabulary (`bpe_vocab`;
    the stories' few hundred words stop it far below a large request). `keep_text=False` deletes the text."""
    import os

    from cs336_basics.artifacts import DEFAULT_SPECIAL, load_tokenizer
    from cs336_basics.encode import encode_file
    from cs336_basics.tokenizer import save_tokenizer, train_bpe

    os.makedirs(data_dir, exist_ok=True)
    texts = {split: os.path.join(data_dir, f"{split}.txt") for split in ("train", "val")}
    write_corpus(texts["train"], num_stories=num_stories, seed=0)
    write_corpus(texts["val"], num_stories=max(num_stories // 20, 50), seed=1)
    vocab, merges = train_bpe(texts["train"], vocab_size, [DEFAULT_SPECIAL], num_workers=workers)
    save_tokenizer(vocab, merges, os.path.join(data_dir, "tokenizer"))
    tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer"), [DEFAULT_SPECIAL])
    info: dict = {"bpe_vocab_requested": vocab_size, "bpe_vocab": len(vocab), "num_stories": num_stories}
    for split in ("train", "val"):
        path = os.path.join(data_dir, f"{split}.npy")
        info[f"{split}_data"] = path
        info[f"{split}_tokens"] = encode_file(tokenizer, texts[split], path, num_workers=workers)
        if not keep_text:
            os.remove(texts[split])
    return info
