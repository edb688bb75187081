"""Paths into nested-dict pytrees (params, masks): one spelling for every module."""


def path_name(path) -> str:
    """'layers/self_attn/q_proj' from a jax key path."""
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def get_path(tree: dict, path: tuple[str, ...]):
    """tree[path[0]][path[1]]..."""
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    """tree[path[0]][path[1]]... = value, making the inner dicts on the way."""
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value
