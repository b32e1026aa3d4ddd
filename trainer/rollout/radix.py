"""A small radix index over token sequences: which stored sequence shares the longest prefix.

The embedded engine stores the key/value cache of every finished trace once and registers its
token ids here; a summary fork looks up ``prompt + z[:c] + delimiter`` and gets the stored
sequence (any one of those that share the match) and the length of the shared prefix. Edges hold
runs of tokens (a compressed trie), so a long trace costs one node, not one per token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

Value = TypeVar("Value")


@dataclass
class _Node(Generic[Value]):
    edge: tuple[int, ...]
    value: Value | None  # of one stored sequence that passes through this node
    terminal: Value | None = None  # of the stored sequence that ends at this node
    children: dict[int, _Node[Value]] = field(default_factory=dict)


class RadixIndex(Generic[Value]):
    """Maps token sequences to values; :meth:`match` finds the longest stored prefix of a query.

    Every node keeps the value of one sequence that passes through it, so a match that ends in
    the middle of a stored sequence still names a sequence holding that prefix.
    """

    def __init__(self) -> None:
        self._root: _Node[Value] = _Node(edge=(), value=None)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        self._root = _Node(edge=(), value=None)
        self._size = 0

    def insert(self, tokens: Sequence[int], value: Value) -> None:
        """Register ``tokens`` with ``value`` (a later insert of the same tokens replaces it)."""
        tokens = tuple(int(t) for t in tokens)
        if not tokens:
            raise ValueError("cannot index an empty token sequence")
        node, pos = self._root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None:
                node.children[tokens[pos]] = _Node(edge=tokens[pos:], value=value, terminal=value)
                self._size += 1
                return
            shared = _common_length(child.edge, tokens, pos)
            if shared < len(child.edge):
                # Split the edge: the new inner node covers the shared run.
                inner = _Node(edge=child.edge[:shared], value=value, children={child.edge[shared]: child})
                child.edge = child.edge[shared:]
                node.children[tokens[pos]] = inner
                child = inner
            else:
                child.value = value
            node, pos = child, pos + shared
        if node.terminal is None:
            self._size += 1
        node.terminal = value

    def remove(self, tokens: Sequence[int]) -> None:
        """Forget the stored sequence ``tokens`` (evicted): nodes only it passed through go, and the
        nodes it shares with other sequences name one of those instead."""
        tokens = tuple(int(t) for t in tokens)
        path, node, pos = [], self._root, 0
        while pos < len(tokens):
            child = node.children.get(tokens[pos])
            if child is None or tokens[pos : pos + len(child.edge)] != child.edge:
                break
            path.append((node, child))
            node, pos = child, pos + len(child.edge)
        if pos != len(tokens) or node.terminal is None:
            raise KeyError(f"no stored sequence of exactly these {len(tokens)} tokens")
        removed, node.terminal = node.terminal, None
        for parent, child in reversed(path):
            if child.value is not removed:
                continue
            if child.terminal is None and not child.children:
                del parent.children[child.edge[0]]
            else:
                child.value = (
                    child.terminal if child.terminal is not None else next(iter(child.children.values())).value
                )
        self._size -= 1

    def match(self, tokens: Sequence[int]) -> tuple[Value | None, int]:
        """``(value, length)`` of the longest prefix of ``tokens`` that a stored sequence shares."""
        node, pos, best = self._root, 0, None
        while pos < len(tokens):
            child = node.children.get(int(tokens[pos]))
            if child is None:
                break
            shared = _common_length(child.edge, tokens, pos)
            best = child.value
            pos += shared
            if shared < len(child.edge):
                break
            node = child
        return (best, pos) if best is not None else (None, 0)


def _common_length(edge: tuple[int, ...], tokens: Sequence[int], start: int) -> int:
    limit = min(len(edge), len(tokens) - start)
    i = 0
    while i < limit and edge[i] == int(tokens[start + i]):
        i += 1
    return i
