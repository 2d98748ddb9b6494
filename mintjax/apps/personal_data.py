"""A seeded generator of per-user personal data the base model cannot know.

Owns `make_personal_data` (N users, each with random personal facts: the
cat's name, home town, favourite colour, ...), its train / held-out split
(held-out prompts are paraphrases of the trained questions, so exact-match
measures recall of the fact, not of the wording) and `write_jsonl`, which
writes the `{"user", "prompt", "completion"}` files the train pipeline reads.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

_NAMES = ("Biscuit", "Pepper", "Mochi", "Ziggy", "Luna", "Waffles", "Nimbus",
          "Pixel", "Tofu", "Juniper", "Olive", "Pickles", "Rocket", "Saffron",
          "Clover", "Marble")
_CITIES = ("Lisbon", "Osaka", "Tbilisi", "Quito", "Bergen", "Hanoi", "Perth",
           "Tallinn", "Cusco", "Accra", "Split", "Malmo", "Leeds", "Hobart")
_COLORS = ("teal", "amber", "crimson", "violet", "ochre", "indigo", "coral",
           "jade", "maroon", "silver", "mauve", "olive")
_FOODS = ("ramen", "paella", "pierogi", "falafel", "laksa", "gnocchi",
          "tacos", "dumplings", "risotto", "borscht", "biryani", "crepes")
_JOBS = ("potter", "pilot", "baker", "geologist", "violinist", "nurse",
         "architect", "beekeeper", "chemist", "tailor", "ranger", "editor")

# fact -> (choices, training phrasings, held-out phrasings)
FACTS = {
    "cat": (_NAMES, ("What is my cat's name?", "Tell me my cat's name.",
                     "My cat is called what?"),
            ("What do I call my cat?",)),
    "hometown": (_CITIES, ("Where was I born?", "What is my home town?",
                           "Which city am I from?"),
                 ("In which city was I born?",)),
    "color": (_COLORS, ("What is my favourite colour?",
                        "Which colour do I like best?",
                        "Name my favourite colour."),
              ("What colour is my favourite?",)),
    "food": (_FOODS, ("What is my favourite food?", "Which dish do I love?",
                      "What food do I like most?"),
             ("What is the food I like best?",)),
    "job": (_JOBS, ("What is my job?", "What do I do for work?",
                    "What is my profession?"),
            ("What is my occupation?",)),
}


def make_personal_data(num_users: int, seed: int = 0,
                       facts: Sequence[str] = ("cat", "hometown", "color"),
                       user_prefix: str = "user"
                       ) -> tuple[list[dict], list[dict], dict]:
  """Per-user personal facts as train and held-out records.

  Args:
    num_users: N users, named f'{user_prefix}{i:04d}'.
    seed: the whole data set is a function of the seed.
    facts: fact kinds from FACTS.
    user_prefix: user id prefix.

  Returns:
    (train records, held-out records, truth) where records are dicts
    {'user', 'prompt', 'completion'} and truth maps user -> {fact: answer}.
  """
  unknown = [f for f in facts if f not in FACTS]
  if unknown:
    raise ValueError(f"unknown facts {unknown}; choose from {sorted(FACTS)}")
  if num_users < 1:
    raise ValueError(f"num_users must be >= 1, got {num_users}")
  rng = np.random.default_rng(seed)
  train, heldout, truth = [], [], {}
  for i in range(num_users):
    user = f"{user_prefix}{i:04d}"
    truth[user] = {}
    for f in facts:
      choices, phrasings, held = FACTS[f]
      answer = str(choices[int(rng.integers(len(choices)))])
      truth[user][f] = answer
      for q in phrasings:
        train.append({"user": user, "prompt": q, "completion": " " + answer})
      for q in held:
        heldout.append({"user": user, "prompt": q, "completion": " " + answer})
  return train, heldout, truth


def write_jsonl(records: Sequence[dict], path: str) -> str:
  """Writes records one JSON object per line; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r, sort_keys=True) + "\n")
  return path


def write_personal_data(directory: str, num_users: int, seed: int = 0,
                        facts: Sequence[str] = ("cat", "hometown", "color")
                        ) -> dict:
  """Writes train/personal.jsonl and heldout/personal.jsonl under directory.

  Returns:
    {'train': path, 'heldout': path, 'truth': user -> facts}.
  """
  train, heldout, truth = make_personal_data(num_users, seed, facts)
  return {
      "train": write_jsonl(train, os.path.join(directory, "train",
                                               "personal.jsonl")),
      "heldout": write_jsonl(heldout, os.path.join(directory, "heldout",
                                                   "personal.jsonl")),
      "truth": truth,
  }
