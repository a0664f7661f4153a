"""The demo's training text: deterministic pseudo-English, generated at run time.

Nothing is downloaded and nothing large is committed: a small grammar (a few hundred words in
sentence templates) is expanded with a private splitmix64 generator, so the text is the same on
every machine and every Python version. The result reads like a plain children's story; a
character-level model learns its spelling, spacing and punctuation within a few hundred steps.
"""

from __future__ import annotations

import re

__all__ = ["generate_corpus"]

_MASK = (1 << 64) - 1

_WORDS = {
    "name": "Ada Bram Cora Dunstan Elsie Finn Greta Hugo Iris Jonah Kit Lena Milo Nora Otto Pia "
    "Quentin Rosa Silas Tilda Ulric Vera Wendel Xena Yusuf Zelda",
    "noun": "river garden lantern window kettle harbour orchard meadow ladder basket candle "
    "mountain village market bridge letter pocket blanket sparrow fox badger rabbit heron "
    "owl horse cart wheel stone road forest cottage kitchen table chair door roof chimney "
    "apple pear loaf bread cheese honey teapot book map compass boat sail rope anchor "
    "island lighthouse storm cloud morning evening winter summer autumn spring hill valley "
    "well bucket field fence gate barn lamb goat bell clock tower song story",
    "plural": "rivers gardens lanterns windows apples stones letters candles sparrows foxes "
    "clouds boats roads hills fields stars leaves shadows friends neighbours songs stories",
    "adj": "old quiet small bright cold warm green golden silver crooked narrow wide gentle "
    "busy sleepy tall round hollow dusty shining patient clever careful brave muddy windy "
    "little heavy empty secret distant early late",
    "verb_past": "found carried watched mended opened painted followed remembered crossed "
    "climbed counted gathered passed visited folded lifted noticed wrapped pulled pushed "
    "carved borrowed",
    "verb_intr": "waited laughed wandered listened slept sang whispered hurried rested "
    "shivered smiled paused",
    "prep": "near beside behind under over across through beyond toward along inside",
    "adverb": "slowly quietly carefully suddenly gladly softly twice again together",
    "time": "At dawn|In the evening|Later that day|Before supper|After the rain|"
    "On the third morning|Long ago|That winter|By noon|When the bell rang",
    "said": "said|asked|called|answered|whispered|replied",
}
_LISTS = {k: v.split("|") if "|" in v else v.split() for k, v in _WORDS.items()}

_TEMPLATES = [
    "{name} {verb_past} the {adj} {noun} {prep} the {noun}.",
    "{time}, {name} and {name} {verb_past} a {adj} {noun}.",
    "The {noun} was {adj}, and the {plural} were {adj}.",
    "{name} {verb_intr} {adverb} {prep} the {adj} {noun}.",
    '"Where is the {noun}?" {said} {name}.',
    '"The {noun} is {prep} the {noun}," {said} {name}, "and it is {adj}."',
    "Nobody knew why the {plural} {verb_intr} {prep} the {noun}.",
    "{time}, the {adj} {plural} {verb_intr} {adverb}.",
    "{name} counted {count} {plural} and {count} {plural}.",
    "It was a {adj} {noun}, with a {adj} {noun} {prep} it.",
]
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiou])")
_COUNTS = "two three four five six seven eight nine ten eleven twelve".split()


class _SplitMix64:
    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def below(self, n: int) -> int:
        self.state = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return (z ^ (z >> 31)) % n

    def pick(self, options: list[str]) -> str:
        return options[self.below(len(options))]


def _sentence(rng: _SplitMix64) -> str:
    template = rng.pick(_TEMPLATES)
    out, rest = [], template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        key, _, rest = tail.partition("}")
        out.append(head)
        out.append(rng.pick(_COUNTS) if key == "count" else rng.pick(_LISTS[key]))
    out.append(rest)
    text = _ARTICLE.sub(r"\1n ", "".join(out))
    return text[0].upper() + text[1:]


def generate_corpus(size: int = 256 * 1024, *, seed: int = 1234) -> str:
    """About ``size`` characters of pseudo-English paragraphs; identical for equal arguments.

    Example:
        >>> generate_corpus(200)[:30]  # doctest: +SKIP
        'Greta mended the quiet ladder '
    """
    rng = _SplitMix64(seed)
    paragraphs: list[str] = []
    total = 0
    while total < size:
        sentences = [_sentence(rng) for _ in range(3 + rng.below(5))]
        paragraph = " ".join(sentences)
        paragraphs.append(paragraph)
        total += len(paragraph) + 2
    return "\n\n".join(paragraphs)[:size]
