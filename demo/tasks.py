"""Tasks of the embedded demo model and the deterministic strings it is trained/evaluated on.

Pure Python (no torch), so that tests and tools can import it cheaply:

    from demo.tasks import TASKS, heldout_strings

``TASKS`` maps an adapter name to the function giving the expected output for an input
string; the empty name ``""`` is the base model alone (echo).  Inputs are 1..``MAX_LEN``
characters from ``ALPHABET`` (lower-case a-z, digits 0-9 and space).

Prompt format (what the tokenizer in ``demo/base`` builds by itself with
``add_special_tokens=True``)::

    <s> c1 c2 ... cn <sep>      -> the model generates   o1 o2 ... on </s>

one token per character.
"""

from __future__ import annotations

import random
import string

ALPHABET = string.ascii_lowercase + string.digits + " "
MAX_LEN = 20
HELDOUT_SEED = 12345

_ROT13 = str.maketrans(
    string.ascii_lowercase + string.ascii_uppercase,
    string.ascii_lowercase[13:] + string.ascii_lowercase[:13]
    + string.ascii_uppercase[13:] + string.ascii_uppercase[:13],
)


def echo(s: str) -> str:
    """Base model: the input unchanged."""
    return s


def upper(s: str) -> str:
    """``upper`` adapter: letters to upper case, digits and spaces unchanged."""
    return s.upper()


def reverse(s: str) -> str:
    """``reverse`` adapter: the characters in reverse order."""
    return s[::-1]


def rot13(s: str) -> str:
    """``rot13`` adapter: letters rotated by 13, digits and spaces unchanged."""
    return s.translate(_ROT13)


TASKS = {"": echo, "upper": upper, "reverse": reverse, "rot13": rot13}
ADAPTERS = ("upper", "reverse", "rot13")


def random_string(rng: random.Random, min_len: int = 1, max_len: int = MAX_LEN,
                  alphabet: str = ALPHABET) -> str:
    """One string: length uniform in [min_len, max_len], characters uniform over ``alphabet``."""
    n = rng.randint(min_len, max_len)
    return "".join(rng.choice(alphabet) for _ in range(n))


def random_strings(n: int, seed: int) -> list[str]:
    """``n`` strings drawn by ``random_string`` from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return [random_string(rng) for _ in range(n)]


def heldout_strings(n: int = 200, seed: int = HELDOUT_SEED) -> list[str]:
    """The evaluation strings (never used as training strings when longer than 3 chars).

    Deterministic: ``random.Random(seed)``, lengths uniform in 1..20, characters uniform
    over ``ALPHABET``.  The first ``n`` of a larger call are the same strings.
    """
    return random_strings(n, seed)
