"""Data layer: language equivalence of NL-RX regexes, decided the way the deep-regex reference evaluator decides it.

The reference (nicholaslocascio/deep-regex, `regexDFAEquals.py` + `regex_dfa_equals.jar`) first replaces the
placeholders with fixed text (`<M0>`..`<M3>` -> "dog", "truck", "ring", "lake"; `<VOW>` -> "AEIOUaeiou",
`<LET>` -> "A-Za-z", `<CAP>` -> "A-Z", `<LOW>` -> "a-z", `<NUM>` -> "0-9"), deletes the spaces, and hands the
string to dk.brics.automaton's `RegExp`, whose language is matched against whole strings. We do the same
substitution and parse dk.brics' grammar, so its conventions carry over:

* precedence, loosest first: `|`, then `&`, then concatenation, then postfix `* + ? {n} {n,} {n,m}`,
  then prefix `~` (so `~a*` is `(~a)*`); `~` complements against all strings, `.` is any one character;
* `\\x` is the literal character x. NL-RX writes `\\ b` where it means a word boundary, but the reference
  evaluator reads it as the letter "b"; we follow the evaluator, since that is what NL-RX accuracies measure;
* `"..."` is a literal string, `#` the empty language, `@` any string, `()` the empty string;
  `<...>` (named automata / numeric intervals) is unsupported and makes the regex invalid.

Automata are built over a small alphabet: every character range that the two regexes mention is cut at its
end points, and characters that no leaf set tells apart share one symbol (for NL-RX: the letters of the
literals, "b", other lowercase, upper vowels, other capitals, digits, everything else). Each operator
produces a complete, minimized DFA (products for `|`/`&`, subset construction for concatenation and
stars, flipping for `~`); equivalence is a search of the product of the two DFAs for a state pair that
disagrees on acceptance. This is exact, and the path to such a pair is a witness string.

Guard against blow-up: when an intermediate DFA would exceed `max_states` states, or all steps together
explore more than WORK_FACTOR * max_states states, the DFA route is abandoned and the regexes are compared
on strings instead: all strings of up to two symbols plus seeded random strings generated from the shapes
of the two regexes (and near misses of them), checked with a direct (memoized, position-set) matcher.
That verdict can say "equal" wrongly, so `Verdict.exact` is False for it. No NL-RX gold regex gets near
the cap (the largest minimized DFA among them has a few hundred states).
"""
from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

# Exactly the reference's substitutions, in its order.
PLACEHOLDERS = (("<VOW>", "AEIOUaeiou"), ("<NUM>", "0-9"), ("<LET>", "A-Za-z"), ("<CAP>", "A-Z"),
                ("<LOW>", "a-z"), ("<M0>", "dog"), ("<M1>", "truck"), ("<M2>", "ring"), ("<M3>", "lake"))
MAX_CHAR = 0x10FFFF
MAX_REPEAT = 1000  # larger {n,m} bounds make the regex invalid (the reference would exhaust memory on them)
DEFAULT_MAX_STATES = 5000  # per intermediate DFA
WORK_FACTOR = 4  # and at most 4x that many states explored in all, over every construction step


class RegexSyntaxError(ValueError):
    """The regex is not in the grammar (or uses a construct we refuse)."""


class _TooBig(Exception):
    """A DFA outgrew the state cap: fall back to sampling."""


@dataclass(frozen=True)
class Verdict:
    equal: bool
    exact: bool  # False when decided by sampled strings after a DFA blow-up (then "equal" may be wrong)
    witness: str | None  # when unequal: a string that exactly one of the two regexes matches


def unprocess(regex: str) -> str:
    """NL-RX token text -> the dk.brics regex string the reference evaluator checks."""
    for placeholder, text in PLACEHOLDERS:
        regex = regex.replace(placeholder, text)
    return "".join(regex.split())


# ---------------------------------------------------------------- parsing (dk.brics RegExp grammar)
# Nodes are hashable tuples: ("set", ((lo, hi), ...)), ("eps",), ("empty",), ("any*",), ("cat", a, b),
# ("or", a, b), ("and", a, b), ("not", a), ("rep", a, n, m) with m None for unbounded (`*` is n=0).
EPS, EMPTY, ANY_STRING = ("eps",), ("empty",), ("any*",)
ANY_CHAR = ("set", ((0, MAX_CHAR),))


def _char(c: str) -> tuple:
    return ("set", ((ord(c), ord(c)),))


def _string(s: str) -> tuple:
    node = EPS
    for c in reversed(s):
        node = _char(c) if node == EPS else ("cat", _char(c), node)
    return node


class _Parser:
    def __init__(self, text: str):
        self.s, self.i = text, 0

    def more(self) -> bool:
        return self.i < len(self.s)

    def peek(self, chars: str) -> bool:
        return self.more() and self.s[self.i] in chars

    def match(self, c: str) -> bool:
        if self.peek(c):
            self.i += 1
            return True
        return False

    def next(self) -> str:
        if not self.more():
            raise RegexSyntaxError("unexpected end of regex")
        self.i += 1
        return self.s[self.i - 1]

    def parse(self) -> tuple:
        if not self.s:
            return EPS
        node = self.union()
        if self.more():
            raise RegexSyntaxError(f"end of regex expected at position {self.i}")
        return node

    def union(self) -> tuple:
        node = self.inter()
        return ("or", node, self.union()) if self.match("|") else node

    def inter(self) -> tuple:
        node = self.concat()
        return ("and", node, self.inter()) if self.match("&") else node

    def concat(self) -> tuple:
        node = self.repeat()
        if self.more() and not self.peek(")|&"):
            node = ("cat", node, self.concat())
        return node

    def repeat(self) -> tuple:
        node = self.complement()
        while self.peek("?*+{"):
            op = self.next()
            if op == "?":
                node = ("rep", node, 0, 1)
            elif op == "*":
                node = ("rep", node, 0, None)
            elif op == "+":
                node = ("rep", node, 1, None)
            else:
                low = self.integer()
                high = (self.integer() if self.peek("0123456789") else None) if self.match(",") else low
                if not self.match("}"):
                    raise RegexSyntaxError(f"expected '}}' at position {self.i}")
                if max(low, high or 0) > MAX_REPEAT:
                    raise RegexSyntaxError(f"repeat bound above {MAX_REPEAT}")
                node = ("rep", node, low, high) if high is None or low <= high else EMPTY
        return node

    def integer(self) -> int:
        start = self.i
        while self.peek("0123456789"):
            self.i += 1
        if start == self.i:
            raise RegexSyntaxError(f"integer expected at position {self.i}")
        return int(self.s[start:self.i])

    def complement(self) -> tuple:
        return ("not", self.complement()) if self.match("~") else self.char_class()

    def char_class(self) -> tuple:
        if not self.match("["):
            return self.simple()
        negate = self.match("^")
        ranges = list(self.class_item())
        while self.more() and not self.peek("]"):
            ranges += self.class_item()
        if not self.match("]"):
            raise RegexSyntaxError(f"expected ']' at position {self.i}")
        if negate:  # complement within single characters
            ranges, covered, lo = [], sorted(ranges), 0
            for a, b in covered:
                if a > lo:
                    ranges.append((lo, a - 1))
                lo = max(lo, b + 1)
            if lo <= MAX_CHAR:
                ranges.append((lo, MAX_CHAR))
        return ("set", tuple(sorted(set(ranges)))) if ranges else EMPTY

    def class_item(self) -> list[tuple[int, int]]:
        c = self.char_exp()
        if not self.match("-"):
            return [(ord(c), ord(c))]
        if self.peek("]"):
            return [(ord(c), ord(c)), (ord("-"), ord("-"))]
        end = self.char_exp()
        if ord(end) < ord(c):
            raise RegexSyntaxError(f"invalid range {c}-{end}")
        return [(ord(c), ord(end))]

    def char_exp(self) -> str:
        self.match("\\")
        return self.next()

    def simple(self) -> tuple:
        if self.match("."):
            return ANY_CHAR
        if self.match("#"):
            return EMPTY
        if self.match("@"):
            return ANY_STRING
        if self.match('"'):
            start = self.i
            while self.more() and not self.peek('"'):
                self.i += 1
            if not self.match('"'):
                raise RegexSyntaxError("unterminated string literal")
            return _string(self.s[start:self.i - 1])
        if self.match("("):
            if self.match(")"):
                return EPS
            node = self.union()
            if not self.match(")"):
                raise RegexSyntaxError(f"expected ')' at position {self.i}")
            return node
        if self.peek("<"):
            raise RegexSyntaxError(f"unsupported '<' at position {self.i} (unknown placeholder?)")
        return _char(self.char_exp())


@lru_cache(maxsize=4096)
def parse(regex: str) -> tuple:
    """NL-RX token text (placeholders, spaces) -> syntax tree; raises RegexSyntaxError."""
    return _Parser(unprocess(regex)).parse()


# ---------------------------------------------------------------- alphabet
def _leaf_sets(node: tuple, out: set) -> set:
    if node[0] == "set":
        out.add(node[1])
    for child in node[1:]:
        if isinstance(child, tuple) and child and isinstance(child[0], str):
            _leaf_sets(child, out)
    return out


@dataclass(frozen=True)
class _Alphabet:
    """Symbols are classes of characters that every leaf set of the compared regexes treats alike."""
    members: dict[tuple, frozenset[int]]  # leaf range-set -> the symbols inside it
    chars: tuple[str, ...]  # one representative character per symbol (for witnesses)

    @property
    def size(self) -> int:
        return len(self.chars)

    def text(self, word: tuple[int, ...]) -> str:
        return "".join(self.chars[symbol] for symbol in word)


def _alphabet(nodes) -> _Alphabet:
    """Cut the character space at every range end point the leaves mention, then merge the pieces that
    have the same membership in every leaf set."""
    leaves = sorted(set().union(*(_leaf_sets(n, set()) for n in nodes)))
    cuts = sorted({0, MAX_CHAR + 1} | {p for ranges in leaves for lo, hi in ranges for p in (lo, hi + 1)})
    symbol_of_signature: dict[tuple, int] = {}
    members: dict[tuple, set[int]] = {leaf: set() for leaf in leaves}
    chars: list[str] = []
    for point, end in zip(cuts, cuts[1:]):  # the elementary interval [point, end)
        inside = tuple(any(lo <= point <= hi for lo, hi in ranges) for ranges in leaves)
        printable = chr(max(point, ord("!"))) if end > ord("!") else None  # nicer witnesses than "\x00"
        if inside not in symbol_of_signature:
            symbol_of_signature[inside] = len(chars)
            chars.append(printable or chr(point))
        elif printable and chars[symbol_of_signature[inside]] < "!":
            chars[symbol_of_signature[inside]] = printable
        for leaf, hit in zip(leaves, inside):
            if hit:
                members[leaf].add(symbol_of_signature[inside])
    return _Alphabet({leaf: frozenset(s) for leaf, s in members.items()}, tuple(chars))


# ---------------------------------------------------------------- DFAs
@dataclass(frozen=True)
class _Dfa:
    trans: tuple[tuple[int, ...], ...]  # state -> symbol -> state; state 0 is the start; always complete
    accept: tuple[bool, ...]


def _minimize(trans: list, accept: list) -> _Dfa:
    """Hopcroft partition refinement, then the blocks renumbered breadth-first from the start."""
    n, k = len(trans), len(trans[0])
    predecessors = [[[] for _ in range(n)] for _ in range(k)]  # [symbol][target] -> sources
    for source, row in enumerate(trans):
        for symbol, target in enumerate(row):
            predecessors[symbol][target].append(source)
    blocks = [b for b in ({s for s in range(n) if accept[s]}, {s for s in range(n) if not accept[s]}) if b]
    block_of = [0] * n
    for i, b in enumerate(blocks):
        for s in b:
            block_of[s] = i
    pending = set(range(len(blocks)))
    while pending:
        splitter = list(blocks[pending.pop()])
        for symbol in range(k):
            touched: dict[int, set[int]] = {}
            for target in splitter:
                for source in predecessors[symbol][target]:
                    touched.setdefault(block_of[source], set()).add(source)
            for i, inside in touched.items():
                if len(inside) == len(blocks[i]):
                    continue
                blocks[i] -= inside
                blocks.append(inside)
                for s in inside:
                    block_of[s] = len(blocks) - 1
                if i in pending:
                    pending.add(len(blocks) - 1)
                else:
                    pending.add(i if len(blocks[i]) < len(inside) else len(blocks) - 1)
    order, number = [block_of[0]], {block_of[0]: 0}
    for b in order:
        for t in trans[next(iter(blocks[b]))]:
            if block_of[t] not in number:
                number[block_of[t]] = len(order)
                order.append(block_of[t])
    rows = (trans[next(iter(blocks[b]))] for b in order)
    return _Dfa(tuple(tuple(number[block_of[t]] for t in row) for row in rows),
                tuple(accept[next(iter(blocks[b]))] for b in order))


class _Builder:
    """Compiles syntax trees to minimized complete DFAs, one operator at a time."""

    def __init__(self, alphabet: _Alphabet, cap: int):
        self.alphabet, self.k, self.cap = alphabet.members, alphabet.size, cap
        self.budget = WORK_FACTOR * cap  # states explored over all steps (long {n} chains add up)
        self.memo: dict[tuple, _Dfa] = {}

    def explore(self, start, step, accepting) -> _Dfa:
        """Reachable part of the automaton whose states are hashable keys, then minimized."""
        ids, keys, trans = {start: 0}, [start], []
        for key in keys:  # keys grows while we iterate: breadth-first
            row = []
            for symbol in range(self.k):
                nxt = step(key, symbol)
                if nxt not in ids:
                    if len(keys) >= self.cap:
                        raise _TooBig
                    ids[nxt] = len(keys)
                    keys.append(nxt)
                row.append(ids[nxt])
            trans.append(tuple(row))
        self.budget -= len(keys)
        if self.budget < 0:
            raise _TooBig
        return _minimize(trans, [accepting(key) for key in keys])

    def build(self, node: tuple) -> _Dfa:
        if node not in self.memo:
            self.memo[node] = self._build(node)
        return self.memo[node]

    def _build(self, node: tuple) -> _Dfa:
        k, kind = self.k, node[0]
        if kind == "set":  # states: start, accept, dead
            symbols = self.alphabet[node[1]]
            return self.explore(0, lambda s, a: 1 if s == 0 and a in symbols else 2, lambda s: s == 1)
        if kind == "eps":
            return self.explore(0, lambda s, a: 1, lambda s: s == 0)
        if kind in ("empty", "any*"):
            return _Dfa((tuple([0] * k),), (kind == "any*",))
        if kind == "not":
            inner = self.build(node[1])
            return _Dfa(inner.trans, tuple(not a for a in inner.accept))
        if kind in ("or", "and"):
            x, y = self.build(node[1]), self.build(node[2])
            combine = (lambda p, q: p or q) if kind == "or" else (lambda p, q: p and q)
            return self.explore((0, 0), lambda s, a: (x.trans[s[0]][a], y.trans[s[1]][a]),
                                lambda s: combine(x.accept[s[0]], y.accept[s[1]]))
        if kind == "cat":
            return self._concat(self.build(node[1]), self.build(node[2]))
        if kind == "rep":
            return self._repeat(node[1], node[2], node[3])
        raise AssertionError(kind)

    def _concat(self, x: _Dfa, y: _Dfa) -> _Dfa:
        def step(s, a):  # (state of x, set of states of y entered after x accepted a prefix)
            xs = x.trans[s[0]][a]
            ys = {y.trans[q][a] for q in s[1]} | ({0} if x.accept[xs] else set())
            return xs, frozenset(ys)
        return self.explore((0, frozenset({0}) if x.accept[0] else frozenset()), step,
                            lambda s: any(y.accept[q] for q in s[1]))

    def _star(self, x: _Dfa) -> _Dfa:
        def step(s, a):  # s: set of x-states, or None for the fresh start (which accepts the empty string)
            nxt = {x.trans[q][a] for q in (s if s is not None else (0,))}
            return frozenset(nxt | {0}) if any(x.accept[q] for q in nxt) else frozenset(nxt)
        return self.explore(None, step, lambda s: s is None or any(x.accept[q] for q in s))

    def _repeat(self, child: tuple, low: int, high: int | None) -> _Dfa:
        x = self.build(child)
        result = self.build(EPS)
        for _ in range(low):
            result = self._concat(result, x)
        if high is None:
            return self._concat(result, self._star(x))
        optional = self.build(("or", child, EPS))
        for _ in range(high - low):
            result = self._concat(result, optional)
        return result


def _distinguishing_word(x: _Dfa, y: _Dfa) -> tuple[int, ...] | None:
    """A shortest symbol sequence accepted by exactly one of x and y, or None if their languages agree."""
    parent: dict[tuple[int, int], tuple] = {(0, 0): None}
    todo = deque([(0, 0)])
    while todo:
        p, q = pair = todo.popleft()
        if x.accept[p] != y.accept[q]:
            word = []
            while parent[pair] is not None:
                pair, symbol = parent[pair]
                word.append(symbol)
            return tuple(reversed(word))
        for symbol, nxt in enumerate(zip(x.trans[p], y.trans[q])):
            if nxt not in parent:
                parent[nxt] = (pair, symbol)
                todo.append(nxt)
    return None


# ---------------------------------------------------------------- sampling fallback
def _ends(node: tuple, word: tuple, i: int, alphabet: dict, memo: dict) -> frozenset[int]:
    """Positions j such that node matches word[i:j]."""
    key = (id(node), i)  # by identity: hashing a deep tuple costs its size (the tree outlives the memo)
    if key in memo:
        return memo[key]
    kind, n = node[0], len(word)
    if kind == "set":
        out = frozenset({i + 1}) if i < n and word[i] in alphabet[node[1]] else frozenset()
    elif kind == "eps":
        out = frozenset({i})
    elif kind == "empty":
        out = frozenset()
    elif kind == "any*":
        out = frozenset(range(i, n + 1))
    elif kind == "not":
        out = frozenset(range(i, n + 1)) - _ends(node[1], word, i, alphabet, memo)
    elif kind in ("or", "and"):
        x, y = _ends(node[1], word, i, alphabet, memo), _ends(node[2], word, i, alphabet, memo)
        out = x | y if kind == "or" else x & y
    elif kind == "cat":
        out = frozenset().union(*(_ends(node[2], word, j, alphabet, memo)
                                  for j in _ends(node[1], word, i, alphabet, memo)))
    else:  # rep: exactly `low` rounds, then up to high - low more (unbounded: until nothing new)
        _, child, low, high = node
        current = frozenset({i})
        for _ in range(low):  # within len(word) + 2 rounds this empties or stops changing: then stop early
            before, current = current, frozenset().union(*(_ends(child, word, j, alphabet, memo) for j in current))
            if not current or current == before:
                break
        out, rounds = current, 0
        while current and (high is None or rounds < high - low):
            current = frozenset().union(*(_ends(child, word, j, alphabet, memo) for j in current)) - out
            out, rounds = out | current, rounds + 1
    memo[key] = out
    return out


def _generate(node: tuple, members: dict, rng: random.Random, k: int, room: int) -> tuple[int, ...]:
    """A random symbol sequence shaped like node (a member when node has no `~`/`&`; a near miss otherwise),
    cut short once it is `room` symbols long."""
    kind = node[0]
    if room <= 0 or kind in ("eps", "empty"):
        return ()
    if kind == "set":
        return (rng.choice(members[node[1]]),) if members[node[1]] else ()
    if kind == "not" and rng.random() < 0.5:  # members of the complemented part sit right at its edge
        return _generate(node[1], members, rng, k, room)
    if kind in ("any*", "not"):
        return tuple(rng.randrange(k) for _ in range(rng.randint(0, min(4, room))))
    if kind in ("or", "and"):
        return _generate(rng.choice(node[1:]), members, rng, k, room)
    parts = (node[1], node[2]) if kind == "cat" else ()
    if kind == "rep":  # a few rounds around the bounds
        _, child, low, high = node
        parts = (child,) * rng.randint(max(0, low - 1), (low + 3) if high is None else min(high + 1, low + 3))
    word: tuple[int, ...] = ()
    for part in parts:
        if len(word) >= room:
            break
        word += _generate(part, members, rng, k, room - len(word))
    return word


def _sampled_witness(x: tuple, y: tuple, alphabet: _Alphabet, samples: int = 1000,
                     max_len: int = 24) -> tuple[int, ...] | None:
    """A sampled symbol sequence on which x and y disagree, or None if no sample tells them apart. Samples:
    every sequence of up to two symbols, then random sequences of at most max_len symbols generated from
    the shape of either regex, half of them with a symbol changed, inserted or deleted."""
    k, members, rng = alphabet.size, alphabet.members, random.Random(0)
    ordered = {leaf: sorted(symbols) for leaf, symbols in members.items()}  # rng.choice needs a sequence
    words: list[tuple] = [(), *((a,) for a in range(k)), *((a, b) for a in range(k) for b in range(k))]
    for i in range(samples):
        word = list(_generate((x, y)[i % 2], ordered, rng, k, max_len))
        if i % 4 >= 2:  # mutate: near misses find boundaries that exact members never touch
            at = rng.randint(0, len(word))
            word[at:at + rng.randint(0, 1)] = [rng.randrange(k)] * rng.randint(0, 1)
        words.append(tuple(word[:max_len]))
    for word in words:
        if (len(word) in _ends(x, word, 0, members, {})) != (len(word) in _ends(y, word, 0, members, {})):
            return word
    return None


# ---------------------------------------------------------------- public API
def compare(a: str, b: str, *, max_states: int = DEFAULT_MAX_STATES) -> Verdict:
    """Do NL-RX regexes a and b denote the same language? Raises RegexSyntaxError if either is invalid."""
    x, y = parse(a), parse(b)
    if x == y:
        return Verdict(True, True, None)
    alphabet = _alphabet((x, y))
    builder = _Builder(alphabet, max_states)
    try:
        word, exact = _distinguishing_word(builder.build(x), builder.build(y)), True
    except _TooBig:
        word, exact = _sampled_witness(x, y, alphabet), False
    return Verdict(word is None, exact, None if word is None else alphabet.text(word))


def equivalent(a: str, b: str, *, max_states: int = DEFAULT_MAX_STATES) -> bool:
    """Like compare(), but an invalid regex on either side is simply "not equivalent"; never raises."""
    if " ".join(a.split()) == " ".join(b.split()):  # the reference also short-cuts on string equality
        return True
    try:
        return compare(a, b, max_states=max_states).equal
    except (RegexSyntaxError, RecursionError):
        return False
