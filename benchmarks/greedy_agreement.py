"""How often greedy decoding in a lower precision picks the same tokens as float32.

    PYTHONPATH=. python benchmarks/greedy_agreement.py MODEL_DIR --dtype bfloat16

For each prompt, both precisions generate --tokens greedy tokens through the chat path
(cached session, weights cast once); the script prints where they first differ and how
many prompts agree on every token.
"""

from __future__ import annotations

import argparse

from noodle.chat import ChatOptions, open_session
from noodle.inference import generate
from noodle.sampling import SamplingSettings

PROMPTS = [
    "once upon a time",
    "one day, a little girl named lily",
    "tom and his dog went to the park",
    "the sun was shining and",
    "there was a big red ball",
    'mom said, "',
    "the little bird could not fly because",
    "ben wanted to play with his friend",
    "in a small house near the forest",
    "the cat was very hungry, so",
    "sue found a shiny rock",
    "it was a rainy day and",
    "the boy looked at the sky and said",
    "max was a happy dog who",
    "after lunch, they went to",
    "the old man smiled and",
]
GREEDY = SamplingSettings(temperature=0, repetition_penalty=1.0)


def greedy_replies(model: str, backend: str, dtype: str, tokens: int) -> list[list[int]]:
    session, _ = open_session(ChatOptions(model=model, backend=backend, dtype=dtype))
    replies = []
    for prompt in PROMPTS:
        session.reset()
        replies.append(list(generate(session, prompt, tokens, GREEDY)))
    return replies


def first_difference(a: list[int], b: list[int]) -> int | None:
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="model directory")
    parser.add_argument("--dtype", default="bfloat16", help="compared with float32")
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--tokens", type=int, default=50)
    args = parser.parse_args()
    reference = greedy_replies(args.model, args.backend, "float32", args.tokens)
    candidate = greedy_replies(args.model, args.backend, args.dtype, args.tokens)
    agreeing = 0
    for prompt, ref, cand in zip(PROMPTS, reference, candidate, strict=True):
        index = first_difference(ref, cand)
        agreeing += index is None
        verdict = "identical" if index is None else f"first differs at token {index}"
        print(f"{prompt[:40]:<42} {verdict}")
    print(
        f"{agreeing}/{len(PROMPTS)} prompts: {args.dtype} picks the same {args.tokens} greedy "
        "tokens as float32"
    )


if __name__ == "__main__":
    main()
