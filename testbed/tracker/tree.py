"""The tree tracker: shared ranges in a B+tree keyed by start (the seed's "interval tree").

Linux's interval tree is an rbtree augmented with each subtree's largest end, because its
intervals may overlap. Here the ranges are kept disjoint and coalesced, so ordering by start
also orders the ends: the range holding a page is simply the one with the greatest start <= it
(a floor search), and no augmentation is needed. What remains is an ordered map start -> end
with O(log n) insert, delete and floor, and that is what this B+tree is.

Why a B+tree and not an rbtree or treap: in Python every node visit is an interpreted step,
while a search *within* a node is one C-level bisect. A fanout of 64 puts a DMA guest's
hundred ranges in a tree of height 1 and the 4096-range bound in height 2, so a conversion
costs one or two bisects per level instead of a dozen pointer chases -- and the tree still
keeps O(log n) updates when a hostile guest drives it to its bound, where the flat list pays
an O(n) memmove per insert.

Layout. Every node is a `_Node`:

* a leaf holds the ranges: `starts[i]`, `ends[i]` (exclusive), sorted, disjoint, never
  adjacent; `next` links the leaves left to right;
* an inner node holds `children` and `starts[i]` = the smallest start in `children[i]`'s
  subtree, except on the tree's leftmost spine, where `starts[0]` is -1 so a descent never
  needs a bounds test. Consequence used throughout: only the leftmost leaf ever sees a key
  below its first start, and changing the first start of any *other* leaf must be propagated
  to its ancestors (`_fix_min`).

Nodes hold between `fanout // 4` and `fanout` entries (the root excepted): an overfull node
splits in half, an underfull one borrows from a sibling or merges with it. The single-page
conversions that dominate DMA churn are handled in the leaf directly when they cannot change
the structure; everything else goes through the general primitives (`_insert`, `_delete`,
`_set_end`) that descend with a path and rebalance.

Poisoning and the bound are as for every list/tree tracker (tracker/base.py).
"""

from __future__ import annotations

import sys
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from itertools import pairwise

from testbed.errors import UsageError
from testbed.tracker.base import DEFAULT_MAX_RANGES, SharedTracker, check_range, int_bytes

DEFAULT_FANOUT = 64
_SENTINEL = -1  # the key of the leftmost spine: below every GFN


class _Node:
    """A leaf (`children` is _NO_CHILDREN) or an inner node (`ends` is _NO_ENDS)."""

    __slots__ = ("children", "ends", "next", "starts")

    def __init__(self, starts: list[int], ends: list[int], children: list[_Node]) -> None:
        self.starts = starts
        self.ends = ends
        self.children = children
        self.next: _Node | None = None


# Shared, never-mutated placeholders, so a leaf and an inner node are one class with typed
# fields (no Optional to narrow on the hot path) and a leaf test is an identity check.
_NO_CHILDREN: list[_Node] = []
_NO_ENDS: list[int] = []


class TreeTracker(SharedTracker):
    """Shared ranges in a B+tree of fanout `fanout`, keyed by range start."""

    name = "tree"

    def __init__(
        self, guest_pages: int, max_ranges: int = DEFAULT_MAX_RANGES, *, fanout: int = DEFAULT_FANOUT
    ) -> None:
        super().__init__(guest_pages, max_ranges)
        if type(fanout) is not int or fanout < 4:
            raise UsageError(f"tree fanout = {fanout!r}: must be an int >= 4")
        self._max = fanout
        self._min = max(2, fanout // 4)  # >= 2: a non-root leaf never empties by one delete
        self.clear()

    def _grow(self, guest_pages: int) -> None:
        # Memory hotplug: the tree has no sentinel above guest memory (its one is -1, below it),
        # so only the bound moves.
        self._guest_pages = guest_pages

    def clear(self) -> None:
        self._root = _Node([], [], _NO_CHILDREN)
        self._first = self._root  # the leftmost leaf: never freed, only split to its right
        self._height = 0  # inner levels above the leaves
        self._count = 0
        self._poisoned = False

    # -- descent ----------------------------------------------------------------------------

    def _leaf(self, gfn: int) -> _Node:
        """The leaf holding the range with the greatest start <= gfn (or the first leaf)."""
        node = self._root
        h = self._height
        while h:
            node = node.children[bisect_right(node.starts, gfn) - 1]
            h -= 1
        return node

    def _path(self, gfn: int) -> tuple[list[tuple[_Node, int]], _Node]:
        """As _leaf, also returning the (inner node, child index) pairs from the root down."""
        path: list[tuple[_Node, int]] = []
        node = self._root
        for _ in range(self._height):
            i = bisect_right(node.starts, gfn) - 1
            path.append((node, i))
            node = node.children[i]
        return path, node

    # -- general primitives -----------------------------------------------------------------

    def _floor(self, gfn: int) -> tuple[int, int] | None:
        """The range (start, end) with the greatest start <= gfn, if any."""
        leaf = self._leaf(gfn)
        k = bisect_right(leaf.starts, gfn) - 1
        # k < 0 only in the leftmost leaf (any other leaf's first start is <= gfn by descent).
        return (leaf.starts[k], leaf.ends[k]) if k >= 0 else None

    def _set_end(self, start: int, end: int) -> None:
        leaf = self._leaf(start)
        leaf.ends[bisect_left(leaf.starts, start)] = end

    def _insert(self, start: int, end: int) -> None:
        path, leaf = self._path(start)
        k = bisect_right(leaf.starts, start)
        # k == 0 happens only in the leftmost leaf, whose first start is no ancestor's key.
        leaf.starts.insert(k, start)
        leaf.ends.insert(k, end)
        self._count += 1
        if len(leaf.starts) > self._max:
            self._split(path, leaf)

    def _delete(self, start: int) -> None:
        path, leaf = self._path(start)
        k = bisect_left(leaf.starts, start)
        del leaf.starts[k]
        del leaf.ends[k]
        self._count -= 1
        if k == 0 and leaf.starts and leaf is not self._first:
            self._fix_min(path, leaf.starts[0])
        if path and len(leaf.starts) < self._min:
            self._rebalance(path, leaf)

    @staticmethod
    def _fix_min(path: list[tuple[_Node, int]], new_min: int) -> None:
        """Record a non-leftmost leaf's new first start in the ancestors that key it."""
        for node, i in reversed(path):
            node.starts[i] = new_min
            if i:
                break  # above here the subtree's minimum is its first child's, unchanged

    def _split(self, path: list[tuple[_Node, int]], node: _Node) -> None:
        """Split overfull `node` in half, inserting the right half into its parent, upwards."""
        while True:
            mid = len(node.starts) >> 1
            if node.children is _NO_CHILDREN:
                right = _Node(node.starts[mid:], node.ends[mid:], _NO_CHILDREN)
                right.next = node.next
                node.next = right
                del node.ends[mid:]
            else:
                # right.starts[0] came from index mid >= 1, so it is an exact key, not -1.
                right = _Node(node.starts[mid:], _NO_ENDS, node.children[mid:])
                del node.children[mid:]
            del node.starts[mid:]
            key = right.starts[0]
            if not path:
                self._root = _Node([_SENTINEL, key], _NO_ENDS, [node, right])
                self._height += 1
                return
            parent, i = path.pop()
            parent.starts.insert(i + 1, key)
            parent.children.insert(i + 1, right)
            if len(parent.starts) <= self._max:
                return
            node = parent

    def _rebalance(self, path: list[tuple[_Node, int]], node: _Node) -> None:
        """Refill underfull `node` from a sibling (borrow one entry, or merge), upwards."""
        lo = self._min
        while path:
            if len(node.starts) >= lo:
                return
            parent, i = path.pop()
            ps = parent.starts
            pc = parent.children
            leaf = node.children is _NO_CHILDREN
            if i > 0:
                left = pc[i - 1]
                if len(left.starts) > lo:
                    # Borrow left's last entry: node's first start changes, and node is child i
                    # > 0, so its parent's key is the only copy.
                    node.starts.insert(0, left.starts.pop())
                    if leaf:
                        node.ends.insert(0, left.ends.pop())
                    else:
                        node.children.insert(0, left.children.pop())
                    ps[i] = node.starts[0]
                    return
                left.starts.extend(node.starts)  # node is not leftmost: its keys are exact
                if leaf:
                    left.ends.extend(node.ends)
                    left.next = node.next
                else:
                    left.children.extend(node.children)
                del ps[i]
                del pc[i]
            else:
                right = pc[1]  # an inner node always has >= 2 children
                if len(right.starts) > lo:
                    node.starts.append(right.starts.pop(0))
                    if leaf:
                        node.ends.append(right.ends.pop(0))
                    else:
                        node.children.append(right.children.pop(0))
                    ps[1] = right.starts[0]
                    return
                node.starts.extend(right.starts)
                if leaf:
                    node.ends.extend(right.ends)
                    node.next = right.next
                else:
                    node.children.extend(right.children)
                del ps[1]
                del pc[1]
            node = parent
        root = self._root
        if root.children is not _NO_CHILDREN and len(root.children) == 1:
            # The sole child is the leftmost one, so its keys already carry the -1 sentinel.
            self._root = root.children[0]
            self._height -= 1

    # -- mutators ---------------------------------------------------------------------------

    def set_shared(self, gfn: int, npages: int) -> None:
        if type(gfn) is not int or npages != 1 or not 0 <= gfn < self._guest_pages or self._poisoned:
            self._set_shared_any(gfn, npages)
            return
        node = self._leaf(gfn)
        starts = node.starts
        ends = node.ends
        k = bisect_right(starts, gfn) - 1
        if k >= 0:
            e = ends[k]
            if e > gfn:
                return  # already shared
            if e == gfn:
                # Adjacent on the left: extend, unless that needs a merge the leaf cannot do
                # alone (right neighbour in the next leaf, or the leaf would underflow).
                j = k + 1
                if j < len(starts):
                    if starts[j] != gfn + 1:
                        ends[k] = gfn + 1
                        return
                    if len(starts) > self._min or node is self._root:
                        ends[k] = ends[j]
                        del starts[j]
                        del ends[j]
                        self._count -= 1
                        return
                else:
                    nxt = node.next
                    if nxt is None or nxt.starts[0] != gfn + 1:
                        ends[k] = gfn + 1
                        return
                self._set_shared_any(gfn, 1)
                return
        j = k + 1
        if j < len(starts):
            if starts[j] == gfn + 1:
                # Adjacent on the right. j == 0 only in the leftmost leaf, which keys nothing.
                starts[j] = gfn
                return
        else:
            nxt = node.next
            if nxt is not None and nxt.starts[0] == gfn + 1:
                self._set_shared_any(gfn, 1)
                return
        if self._count >= self._max_ranges:
            self._poisoned = True
            return
        if len(starts) >= self._max:
            self._set_shared_any(gfn, 1)  # needs a split
            return
        starts.insert(j, gfn)
        ends.insert(j, gfn + 1)
        self._count += 1

    def set_private(self, gfn: int, npages: int) -> None:
        if type(gfn) is not int or npages != 1 or not 0 <= gfn < self._guest_pages or self._poisoned:
            self._set_private_any(gfn, npages)
            return
        node = self._leaf(gfn)
        starts = node.starts
        k = bisect_right(starts, gfn) - 1
        if k < 0:
            return
        ends = node.ends
        e = ends[k]
        if e <= gfn:
            return  # already private
        if starts[k] == gfn:
            # The leaf's first start is an ancestor's key unless this is the leftmost leaf.
            if k == 0 and node is not self._first:
                self._set_private_any(gfn, 1)
            elif e != gfn + 1:
                starts[k] = gfn + 1
            elif len(starts) > self._min or node is self._root:
                del starts[k]
                del ends[k]
                self._count -= 1
            else:
                self._set_private_any(gfn, 1)  # would underflow
            return
        if e == gfn + 1:
            ends[k] = gfn
            return
        if self._count >= self._max_ranges:
            self._poisoned = True
            return
        if len(starts) >= self._max:
            self._set_private_any(gfn, 1)  # needs a split
            return
        ends[k] = gfn
        starts.insert(k + 1, gfn + 1)
        ends.insert(k + 1, e)
        self._count += 1

    def apply(self, conversions: Iterable[tuple[int, int, bool]]) -> int:
        # A tree step is several node visits, so the call overhead matters less than for the
        # list: bind the two methods once and dispatch.
        ops = conversions if isinstance(conversions, list | tuple) else list(conversions)
        set_shared = self.set_shared
        set_private = self.set_private
        for gfn, npages, shared in ops:
            if shared:
                set_shared(gfn, npages)
            else:
                set_private(gfn, npages)
        return len(ops)

    def _set_shared_any(self, gfn: int, npages: int) -> None:
        """set_shared for any valid range, through the rebalancing primitives."""
        check_range(gfn, npages, self._guest_pages)
        if self._poisoned:
            return
        end = gfn + npages
        f = self._floor(end)  # the rightmost range that can touch [gfn, end]
        if f is None or f[1] < gfn:
            if self._count >= self._max_ranges:
                self._poisoned = True
                return
            self._insert(gfn, end)
            return
        start, fend = f
        end = max(end, fend)
        if start <= gfn:
            # The one range touching the new one (any further left ends before its start, so
            # before gfn): extend it in place, no key changes.
            self._set_end(start, end)
            return
        # Otherwise fold every touching range, right to left, into one new record.
        new_start = gfn
        while f is not None and f[1] >= gfn:
            start = f[0]
            new_start = min(new_start, start)
            self._delete(start)
            f = self._floor(start - 1) if start else None
        self._insert(new_start, end)

    def _set_private_any(self, gfn: int, npages: int) -> None:
        """set_private for any valid range, through the rebalancing primitives."""
        check_range(gfn, npages, self._guest_pages)
        if self._poisoned:
            return
        end = gfn + npages
        f = self._floor(end - 1)  # the rightmost range that can overlap [gfn, end)
        if f is None or f[1] <= gfn:
            return
        start, fend = f
        if start < gfn:
            if fend > end:
                if self._count >= self._max_ranges:
                    self._poisoned = True
                    return
                self._set_end(start, gfn)
                self._insert(end, fend)
            else:
                self._set_end(start, gfn)
            return  # a range starting left of gfn is the leftmost one overlapping
        self._delete(start)
        if fend > end:
            self._insert(end, fend)
        # Drop or trim the ranges further left that still overlap.
        f = self._floor(start - 1) if start else None
        while f is not None and f[1] > gfn:
            start, fend = f
            if start < gfn:
                self._set_end(start, gfn)
                return
            self._delete(start)
            f = self._floor(start - 1) if start else None

    # -- queries ----------------------------------------------------------------------------

    def is_shared(self, gfn: int) -> bool:
        if type(gfn) is not int or not 0 <= gfn < self._guest_pages:
            self._reject(gfn, 1)
        leaf = self._leaf(gfn)
        k = bisect_right(leaf.starts, gfn) - 1
        return k >= 0 and leaf.ends[k] > gfn

    def _leaves(self) -> Iterable[_Node]:
        leaf: _Node | None = self._first
        while leaf is not None:
            yield leaf
            leaf = leaf.next

    def shared_ranges(self) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for leaf in self._leaves():
            out.extend((s, e - s) for s, e in zip(leaf.starts, leaf.ends, strict=True))
        return out

    def range_count(self) -> int:
        return self._count

    @property
    def height(self) -> int:
        """Inner levels above the leaves (0: the root is a leaf)."""
        return self._height

    def _nodes(self) -> Iterable[_Node]:
        level = [self._root]
        while level:
            yield from level
            level = [c for n in level for c in n.children]

    def memory_bytes(self) -> int:
        seen: set[int] = set()
        total = 0
        for node in self._nodes():
            total += sys.getsizeof(node) + sys.getsizeof(node.starts) + int_bytes(node.starts, seen)
            if node.children is _NO_CHILDREN:
                total += sys.getsizeof(node.ends) + int_bytes(node.ends, seen)
            else:
                total += sys.getsizeof(node.children)
        return total

    def memory_bound_bytes(self) -> int:
        # At most max_ranges records; every leaf but a lone root holds >= _min of them, and a
        # tree whose inner nodes have >= 2 children has fewer inner nodes than leaves. A node's
        # lists never exceed _max + 1 items, over-allocated by CPython to n + n/8 + 6 slots.
        cap = self._max_ranges
        leaves = max(1, cap // self._min)
        slots = (self._max + 1) + ((self._max + 1) >> 3) + 8
        node = sys.getsizeof(_Node([], [], _NO_CHILDREN))
        per_node = node + 2 * (sys.getsizeof([]) + 8 * slots)
        ints = (2 * cap + leaves) * sys.getsizeof(self._guest_pages)
        return 2 * leaves * per_node + ints

    def check_invariants(self) -> None:
        """Assert the B+tree's structural invariants (for tests): raises AssertionError."""
        leaves_in_order: list[_Node] = []

        def walk(node: _Node, depth: int, lo: int, leftmost: bool) -> int:
            """Check the subtree; `lo` is its expected minimum key. Returns its range count."""
            is_root = node is self._root
            if depth == self._height:
                assert node.children is _NO_CHILDREN, "inner node at leaf depth"
                assert len(node.starts) == len(node.ends)
                assert is_root or self._min <= len(node.starts) <= self._max, len(node.starts)
                if node.starts and not leftmost:
                    assert node.starts[0] == lo, (node.starts[0], lo)
                leaves_in_order.append(node)
                return len(node.starts)
            assert node.children is not _NO_CHILDREN and node.ends is _NO_ENDS
            assert len(node.starts) == len(node.children)
            assert (2 if is_root else self._min) <= len(node.children) <= self._max
            assert node.starts[0] == (_SENTINEL if leftmost else lo), (node.starts[0], lo)
            assert node.starts == sorted(node.starts)
            total = 0
            for i, child in enumerate(node.children):
                total += walk(child, depth + 1, node.starts[i], leftmost and i == 0)
            return total

        count = walk(self._root, 0, _SENTINEL, True)
        assert count == self._count, (count, self._count)
        assert leaves_in_order[0] is self._first
        assert list(self._leaves()) == leaves_in_order, "leaf chain out of order"
        flat = [(s, e) for leaf in leaves_in_order for s, e in zip(leaf.starts, leaf.ends, strict=True)]
        for (s, e), (s2, _) in pairwise(flat):
            assert s < e < s2, f"ranges overlap or touch: [{s:#x},{e:#x}) then {s2:#x}"
        if flat:
            assert flat[0][0] < flat[0][1] <= self._guest_pages
        assert self._count <= self._max_ranges
