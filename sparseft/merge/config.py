def load_config(*a, **k):
    raise NotImplementedError


def merge_from_config(*a, **k):
    raise NotImplementedError
