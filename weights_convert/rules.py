"""The rule record shared by the mapping tables, and the expansion of block-local tables into full rules.

A table is a list of `Rule`s: one per source key, naming the target key(s) it becomes, the component that owns
them, and the named transform between them (weights_convert/transforms.py). A rule with no targets drops its key
on purpose and says why. The tables are expanded from a config, never matched against a file with patterns:
the file is then checked against the table, key by key, and anything left over on either side is an error.
"""

from __future__ import annotations

from dataclasses import dataclass

PARAMS = ("weight", "bias")


@dataclass(frozen=True)
class Rule:
    source: str  # the key in the source file
    targets: tuple[str, ...]  # the key(s) it becomes in the component's state dict; () = dropped on purpose
    component: str | None  # "unet", "vae" or "text_encoder"; None when dropped
    transform: str = "copy"  # a name in transforms.TRANSFORMS
    note: str = ""  # why a key is dropped (shown in the printed table)
    optional: bool = False  # a dropped key that some files carry and others do not

    @property
    def dropped(self) -> bool:
        return not self.targets


# A block-local table: (source suffix, target suffix, transform) for each parameter of one block kind.
Local = tuple[tuple[str, str, str], ...]


def local(pairs: dict[str, str], params: tuple[str, ...] = PARAMS, transform: str = "copy") -> Local:
    """Expand {source sub-module: target sub-module} over `params` into a block-local table."""
    return tuple((f"{s}.{p}", f"{t}.{p}", transform) for s, t in pairs.items() for p in params)


def expand(component: str, src_prefix: str, dst_prefix: str, table: Local) -> list[Rule]:
    """Rules for one block: every local entry, with the block's source and target prefixes."""
    return [Rule(f"{src_prefix}{s}", (f"{dst_prefix}{t}",), component, tr) for s, t, tr in table]


def drop(source: str, note: str, optional: bool = False) -> Rule:
    return Rule(source, (), None, "copy", note, optional)
