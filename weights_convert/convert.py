"""Applying a mapping table to a checkpoint: strict verification from the header, then the tensors.

`verify` checks a source (a safetensors file, a pickle's dict) against a table before a single weight is read:
every source key has a rule (else "unexpected key"), every rule that maps has its source key (else "missing key"),
every transform accepts its source shape and gives the shapes the model expects (else "shape mismatch", both
shapes named), every key the model expects is produced (else "not produced"). `tensors` then yields the
component's state dict, cast on the way: a tensor already in the requested dtype stays a view of the mapped file;
a cast makes the new copy and lets the source pages go, so peak memory stays near one copy of the weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from weights_convert.rules import Rule
from weights_convert.safetensors_file import CheckpointError
from weights_convert.transforms import TRANSFORMS, target_shapes

MAX_LISTED = 8  # keys listed in one error message


class Source(Protocol):
    path: Path

    def keys(self) -> list[str]: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def tensor(self, key: str) -> Tensor: ...
    def release(self, key: str) -> None: ...


class DictSource:
    """A state dict already in memory (a pickle checkpoint, a test's dict) behind the Source interface."""

    def __init__(self, tensors: dict[str, Tensor], path: Path | str = "<state dict>") -> None:
        bad = [k for k, v in tensors.items() if not isinstance(v, Tensor)]
        if bad:
            raise CheckpointError(f"{path}: entries that are not tensors: {', '.join(map(repr, bad[:MAX_LISTED]))}")
        self.path = Path(path)
        self._t = tensors

    def keys(self) -> list[str]:
        return list(self._t)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._t[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._t[key].dtype

    def tensor(self, key: str) -> Tensor:
        return self._t[key]

    def release(self, key: str) -> None:
        pass


def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - MAX_LISTED} more" if len(keys) > MAX_LISTED else ""
    return ", ".join(repr(k) for k in keys[:MAX_LISTED]) + more


def verify(rules: list[Rule], source: Source, expected: dict[str, dict[str, tuple[int, ...]]],
           what: str = "checkpoint") -> None:
    """Check `source` against `rules` and the models' expected {component: {key: shape}}; raise CheckpointError.

    what: the kind of file, for the messages ("SD 1.5 checkpoint").
    """
    path = source.path
    by_source = {r.source: r for r in rules}
    present = set(source.keys())
    unexpected = present - by_source.keys()
    if unexpected:
        raise CheckpointError(f"{path}: unexpected key(s) for a {what}: {_listed(unexpected)}")
    missing = {r.source for r in rules if not r.dropped and not r.optional} - present
    if missing:
        raise CheckpointError(f"{path}: missing key(s) for a {what}: {_listed(missing)}")
    produced: dict[str, set[str]] = {c: set() for c in expected}
    for key in sorted(present):
        rule = by_source[key]
        if rule.dropped or rule.component not in expected:
            continue
        shape = source.shape(key)
        shapes = target_shapes(rule.transform, shape)
        if shapes is None:
            raise CheckpointError(f"{path}: key {key!r} has shape {list(shape)}, which transform "
                                  f"{rule.transform!r} cannot take ({TRANSFORMS[rule.transform].doc})")
        want = expected[rule.component]
        for target, got in zip(rule.targets, shapes):
            if target not in want:
                raise CheckpointError(f"{path}: key {key!r} maps to {target!r}, which the {rule.component} "
                                      f"does not have")
            if tuple(want[target]) != tuple(got):
                raise CheckpointError(f"{path}: shape mismatch for {key!r} -> {rule.component} {target!r}: the file "
                                      f"has {list(shape)} (giving {list(got)}), the model expects "
                                      f"{list(want[target])}")
            produced[rule.component].add(target)
        if not source.dtype(key).is_floating_point:
            raise CheckpointError(f"{path}: key {key!r} has dtype {source.dtype(key)}; weights must be floating point")
    for component, want in expected.items():
        lacking = want.keys() - produced[component]
        if lacking:
            raise CheckpointError(f"{path}: the {component} needs key(s) the file does not provide: "
                                  f"{_listed(lacking)}")


def tensors(rules: list[Rule], source: Source, component: str,
            dtype: torch.dtype | None) -> Iterator[tuple[str, Tensor]]:
    """Yield (target key, tensor) for one component, cast to `dtype` (None: keep the file's dtype)."""
    present = set(source.keys())
    for rule in rules:
        if rule.component != component or rule.source not in present:
            continue
        raw = source.tensor(rule.source)
        outs = TRANSFORMS[rule.transform].forward(raw)
        cast = dtype is not None and raw.dtype != dtype
        for target, t in zip(rule.targets, outs):
            yield target, (t.to(dtype) if cast else t)
        if cast:
            source.release(rule.source)  # the cast copies are made; the file's pages may go


def convert_state_dict(rules: list[Rule], source: Source, dtype: torch.dtype | None = None,
                       expected: dict[str, dict[str, tuple[int, ...]]] | None = None) -> dict[str, dict[str, Tensor]]:
    """The whole conversion as {component: state dict}; verified first when `expected` shapes are given."""
    if expected is not None:
        verify(rules, source, expected)
    components = sorted({r.component for r in rules if r.component})
    return {c: dict(tensors(rules, source, c, dtype)) for c in components}
