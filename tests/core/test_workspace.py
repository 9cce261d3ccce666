"""The buffer pool of hand-written backwards: reuse, limits, reclaiming, copies."""

import copy
import pickle

import torch

from seqplat.core.workspace import Workspace


def test_keeps_at_most_keep_sets_per_shape_and_knows_what_was_taken_since():
    ws = Workspace(keep=2)
    like = torch.zeros(1)
    sets = [ws.take(((10,), (2, 3)), like) for _ in range(3)]
    assert len({id(s[0]) for s in sets}) == 3 and sets[0][1].shape == (2, 3)
    tickets = [ws.give(s) for s in sets]
    assert len(ws) == 2  # the oldest of the three was dropped
    again = ws.take(((10,), (2, 3)), like)
    assert again is sets[1] and tickets[1][0]
    assert not ws.reclaim(sets[1], tickets[1])  # a retain_graph backward must not read reused buffers
    assert ws.reclaim(sets[2], tickets[2]) and len(ws) == 0


def test_other_shapes_dtypes_and_the_overall_limit():
    ws = Workspace(keep=2, limit=3)
    like = torch.zeros(1)
    ws.give(ws.take(((4,),), like))
    assert ws.take(((4,),), like.double())[0].dtype == torch.float64 and len(ws) == 1  # not the float32 set
    for n in (5, 6, 7):
        ws.give(ws.take(((n,),), like))
    assert [s[0].numel() for s in ws.held()] == [5, 6, 7]  # the oldest beyond `limit` went first
    ws.clear()
    assert len(ws) == 0


def test_copies_and_pickles_start_empty():
    ws = Workspace(keep=3)
    ws.give(ws.take(((8,),), torch.zeros(1)))
    for other in (copy.deepcopy(ws), pickle.loads(pickle.dumps(ws))):
        assert len(other) == 0 and other.keep == 3
