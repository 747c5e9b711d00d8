"""per_head pruning: the caches of a model's layers choosing one token set together.

The reference's default ("per_head") keeps, for each KV head, the same tokens in every
layer, chosen from head scores averaged over the layers. The layers reach a prune round in
the same forward pass (they grow in lockstep); each submits its scores, and the last one
selects and compacts them all.
"""

import copy
import uuid
import weakref


class SharedSelection:
    """The caches of one sequence (or batch) that prune together, one per layer. Held
    weakly: cache and group refer to each other, and a dropped cache must free its arrays
    at once (with strong references only Python's cycle collector would)."""

    def __init__(self, group_id=None):
        self.id = group_id or uuid.uuid4().hex
        self.members, self._scores = weakref.WeakSet(), []

    def add(self, cache):
        self.members.add(cache)

    def submit(self, cache, scores, views):
        """`scores`: {view key: [B', H_kv, N] head scores} of one layer (cache._due_views)."""
        self._scores.append(scores)
        if len(self._scores) < len(self.members):
            return
        submitted, self._scores = self._scores, []
        if any(m._idx != cache._idx or m.settings != cache.settings for m in self.members):
            raise RuntimeError("per_head caches fell out of step (a layer was trimmed or fed "
                               "alone?): trim them together, e.g. mlx_lm's trim_prompt_cache")
        mean = {key: sum(s[key] for s in submitted) / len(submitted) for key in views}
        keeps = cache._select(views, mean)
        for member in self.members:
            member._compact(keeps)

    def __deepcopy__(self, memo):
        # mlx-lm deep-copies prompt caches (BatchGenerator, the server's prompt cache): the
        # copy groups the members' copies
        new = copy.copy(self)
        memo[id(self)] = new
        new.id, new._scores = uuid.uuid4().hex, []
        new.members = weakref.WeakSet(copy.deepcopy(m, memo) for m in list(self.members))
        return new


_FORMING = {}  # key -> group whose member caches are still being made, one per layer


def forming_group(key, size):
    """The group for `key`, shared by the `size` caches made under it one by one (loading a
    saved cache, merging or extracting batch rows); it leaves the registry once complete."""
    group = _FORMING.get(key)
    if group is None:
        group = _FORMING[key] = SharedSelection()
    if len(group.members) + 1 >= size:
        _FORMING.pop(key, None)
    return group
