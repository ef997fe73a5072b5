"""Merges of SparseDeltas on their compact form."""


def merge_deltas(*a, **k):
    raise NotImplementedError


def scale_delta(*a, **k):
    raise NotImplementedError
