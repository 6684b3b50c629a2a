"""The CLIP tokenizer: prompt strings -> token ids (B, 77), on the `tokenizers` library.

Paper: Radford et al. 2021 (CLIP), which uses the byte-level BPE of Sennrich et al. 2016 / GPT-2 with an
end-of-word marker `</w>` (a word-final piece is a different token from the same piece inside a word).
Reference: transformers `models/clip/tokenization_clip.py` (CLIPTokenizer, transformers 5.23.0) and the special-token
loading of `tokenization_utils_base.py`; we build the same `tokenizers.Tokenizer`, so the ids are the same.

The pipeline of one prompt, as transformers 5.x runs it:
1. special tokens (`<|startoftext|>`, `<|endoftext|>`, and the pad token) are matched first and pass through whole;
2. normalize: Unicode NFC, every run of whitespace (spaces, tabs, newlines) -> one space, lower-case;
3. pre-tokenize: CLIP's regex keeps contractions ('s 't 're 've 'm 'll 'd), letter runs, single digits and runs of
   other symbols, and drops whitespace; then GPT-2's byte-level map turns every byte into a printable character;
4. BPE with the 48,894 merges of merges.txt over the 49,408-entry vocab.json, `</w>` closing each word;
5. `__call__`: `[BOS] + ids[:75] + [EOS]`, then padding to 77 with the family's pad token.

SD 1 pads with `<|endoftext|>` (49407), SD 2 with `!` (0). transformers registers the pad token as a special token,
so for SD 2 every `!` in a prompt becomes the special token 0 (`"hi!!"` -> hi, 0, 0, where SD 1 has hi, `!!</w>`);
we do the same because the contract is identical ids.

Shapes: B prompts, 77 = model_max_length.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer pattern, as transformers writes it (the pieces kept; what lies between is dropped).
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")  # transformers' order; a later role wins a shared token
DEFAULTS = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}  # transformers' defaults


def _added_token(value: str | dict[str, Any], role: str) -> AddedToken:
    """A special token from a tokenizer config entry: a plain string (normalized=False, as transformers makes it)
    or an AddedToken dict with its own flags."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "single_word", "normalized") if k in value}
        return AddedToken(value["content"], special=True, **flags)
    raise ValueError(f"CLIPTokenizer: {role} must be a string or an AddedToken dict with 'content', got {value!r}")


def _content(value: Any) -> Any:
    """The text of a special-token config entry (a string, or an AddedToken dict's content)."""
    return value.get("content") if isinstance(value, dict) else value


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[dict[str, Any]]]:
    """The BPE vocab, merges and added tokens of a `tokenizers` JSON file (ValueError naming what is wrong)."""
    if not path.is_file():
        raise FileNotFoundError(f"CLIPTokenizer: no such file {str(path)!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"CLIPTokenizer: {path} is not a JSON file ({e})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type", "BPE") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise ValueError(f"CLIPTokenizer: {path} must hold a BPE model ('model': {{'type': 'BPE', ...}}), "
                         f"got {kind!r}")
    vocab, merges = model.get("vocab"), model.get("merges")
    if not isinstance(vocab, dict) or not isinstance(merges, list):
        raise ValueError(f"CLIPTokenizer: {path}: model.vocab must be an object and model.merges a list")
    pairs = []
    for i, merge in enumerate(merges):  # "a b" (older files) or ["a", "b"] (tokenizers >= 0.20)
        pair = tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge)
        if len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise ValueError(f"CLIPTokenizer: {path}: model.merges[{i}] is not a pair of strings: {merge!r}")
        pairs.append(pair)
    added = [t for t in data.get("added_tokens") or [] if isinstance(t, dict) and isinstance(t.get("content"), str)]
    return vocab, pairs, added


class CLIPTokenizer:
    """CLIP BPE tokenizer: `tok(prompts) -> LongTensor (B, 77)`, the ids of transformers' CLIPTokenizer with
    padding="max_length", max_length=77, truncation=True."""

    def __init__(self, vocab_file: str | Path, merges_file: str | Path,
                 special_tokens: dict[str, str | dict[str, Any]] | None = None, model_max_length: int = 77) -> None:
        """special_tokens: role ("bos_token", "eos_token", "unk_token", "pad_token") -> token (string or
        AddedToken dict), missing roles get transformers' defaults."""
        for path in (vocab_file, merges_file):
            if not Path(path).is_file():
                raise FileNotFoundError(f"CLIPTokenizer: no such file {str(path)!r}")
        vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
        self._build(vocab, merges, special_tokens, model_max_length, str(vocab_file))

    @classmethod
    def from_tokenizer_json(cls, path: str | Path, special_tokens: dict[str, str | dict[str, Any]] | None = None,
                            model_max_length: int = 77) -> "CLIPTokenizer":
        """A `tokenizers` JSON file (what transformers 5's save_pretrained writes: tokenizer.json, no vocab.json or
        merges.txt). As transformers' CLIPTokenizer, only its BPE vocab and merges and its added tokens are read and
        the CLIP pipeline above is built around them, so the ids equal those of the vocab.json + merges.txt form.
        special_tokens: as for the constructor; each role takes the flags of the file's `added_tokens` entry of the
        same content, and the file's other added tokens keep their ids."""
        vocab, merges, added = _read_tokenizer_json(Path(path))
        return cls._assemble(vocab, merges, {**DEFAULTS, **(special_tokens or {})},
                             {t["content"]: t for t in added}, model_max_length, str(path))

    @classmethod
    def _assemble(cls, vocab: dict[str, int], merges: list[tuple[str, str]], special: dict[str, Any],
                  known: dict[str, dict[str, Any]], model_max_length: int, source: str) -> "CLIPTokenizer":
        """A tokenizer whose special roles take the flags of the added token (`known`: content -> AddedToken dict)
        of the same content, with the remaining added tokens added."""
        tok = cls.__new__(cls)
        tok._build(vocab, merges, {role: known.get(_content(value), value) for role, value in special.items()},
                   model_max_length, source, list(known.values()))
        return tok

    def _build(self, vocab: dict[str, int], merges: list[tuple[str, str]],
               special_tokens: dict[str, str | dict[str, Any]] | None, model_max_length: int, source: str,
               extra: Sequence[dict[str, Any]] = ()) -> None:
        """extra: further added tokens (dicts with content, id and flags, as tokenizer.json lists them), e.g. a
        textual-inversion word that a fine-tune saved; they keep their ids."""
        special_tokens = {**DEFAULTS, **(special_tokens or {})}
        unknown = set(special_tokens) - set(ROLES)
        if unknown:
            raise ValueError(f"CLIPTokenizer: unknown special token role(s) {sorted(unknown)}; expected {ROLES}")
        if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or model_max_length < 2:
            raise ValueError(f"CLIPTokenizer: model_max_length must be an int >= 2 (BOS and EOS), got "
                             f"{model_max_length!r}")
        tokens = {role: _added_token(value, role) for role, value in special_tokens.items()}
        for role, token in tokens.items():
            if token.content not in vocab:
                raise ValueError(f"CLIPTokenizer: {role} {token.content!r} is not in the vocabulary {source}")

        tok = Tokenizer(BPE(vocab, merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="</w>",
                            fuse_unk=False, unk_token=tokens["unk_token"].content))
        tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # One AddedToken per content; where roles share one (SD 1: eos = unk = pad), the last role's flags win.
        by_content = {token.content: token for token in tokens.values()}
        tok.add_special_tokens(sorted(by_content.values(), key=lambda t: vocab[t.content]))
        self._add_extra_tokens(tok, [t for t in extra if t["content"] not in by_content], source)
        self._tok = tok
        self.special_tokens = {role: token.content for role, token in tokens.items()}
        self._model_max_length = model_max_length
        self._ids = {role: vocab[token.content] for role, token in tokens.items()}

    @staticmethod
    def _add_extra_tokens(tok: Tokenizer, extra: Sequence[dict[str, Any]], source: str) -> None:
        """Add tokens beyond the special ones in id order, checking each gets the id the file gives it."""
        for entry in sorted(extra, key=lambda t: t.get("id", -1)):
            token = AddedToken(entry["content"], special=bool(entry.get("special", False)),
                               **{k: bool(entry[k]) for k in ("lstrip", "rstrip", "single_word", "normalized")
                                  if k in entry})
            (tok.add_special_tokens if token.special else tok.add_tokens)([token])
            got = tok.token_to_id(token.content)
            if "id" in entry and got != entry["id"]:
                raise ValueError(f"CLIPTokenizer: {source}: added token {token.content!r} has id {entry['id']} but "
                                 f"the vocabulary gives it {got}; its ids must follow the vocabulary's")

    # ---------------------------------------------------------------------------------------------------------
    # Constructors

    @classmethod
    def from_dir(cls, path: str | Path) -> "CLIPTokenizer":
        """A tokenizer folder: tokenizer.json (transformers 5's save_pretrained writes only this) or vocab.json +
        merges.txt (the official SD repos), optionally tokenizer_config.json and special_tokens_map.json.

        As transformers reads a folder: tokenizer.json is preferred when both forms are there. The special tokens
        are the config's roles; unless the config lists its own `added_tokens_decoder`, special_tokens_map.json
        overrides it (SD 2's config says pad "<|endoftext|>", its map "!", and transformers pads with "!") and a
        role's flags (e.g. `normalized`) come from tokenizer.json's `added_tokens` entry of the same content.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIPTokenizer.from_dir: {str(path)!r} is not a folder")
        config = cls._read_json(folder / "tokenizer_config.json")
        special: dict[str, Any] = {role: config[role] for role in ROLES if config.get(role) is not None}
        known: dict[str, Any] = {}  # content -> AddedToken dict, whose flags a role of that content takes
        if isinstance(config.get("added_tokens_decoder"), dict):
            known = {t["content"]: {**t, "id": int(i)} for i, t in config["added_tokens_decoder"].items()
                     if isinstance(t, dict) and isinstance(t.get("content"), str)}
        else:
            special.update({role: value for role, value in cls._read_json(folder / "special_tokens_map.json").items()
                            if role in ROLES and value is not None})
        if (folder / "tokenizer.json").is_file():
            source = folder / "tokenizer.json"
            vocab, merges, added = _read_tokenizer_json(source)
            known = known or {t["content"]: t for t in added}
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            source = folder / "vocab.json"
            vocab, merges = BPE.read_file(str(source), str(folder / "merges.txt"))
        else:
            raise FileNotFoundError(f"CLIPTokenizer.from_dir: {str(folder)!r} holds neither tokenizer.json nor "
                                    f"vocab.json + merges.txt; a CLIP tokenizer folder needs one of the two")
        return cls._assemble(vocab, merges, special, known, config.get("model_max_length", 77), str(source))

    @classmethod
    def packaged(cls, pad_token: str = EOS) -> "CLIPTokenizer":
        """The BPE files shipped in ldm/data/clip_tokenizer (the same for SD 1 and SD 2), with the family's pad
        token: "<|endoftext|>" for SD 1, "!" for SD 2 (`ldm.SD15.pad_token`, `ldm.SD21_V.pad_token`)."""
        if not isinstance(pad_token, str):
            raise TypeError(f"CLIPTokenizer.packaged: pad_token must be a str, got {type(pad_token).__name__}")
        folder = resources.files("ldm") / "data" / "clip_tokenizer"
        # BOS/EOS/UNK as the official tokenizer configs write them (AddedToken dicts, normalized=True).
        special = {role: {"content": DEFAULTS[role], "normalized": True} for role in ("bos_token", "eos_token",
                                                                                       "unk_token")}
        return cls(Path(str(folder / "vocab.json")), Path(str(folder / "merges.txt")),
                   {**special, "pad_token": pad_token})

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any]:
        if not path.is_file():
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"CLIPTokenizer: {path} must hold a JSON object, got {type(data).__name__}")
        return data

    # ---------------------------------------------------------------------------------------------------------
    # Encoding and decoding

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """One prompt or a list -> LongTensor (B, model_max_length): BOS, at most 75 ids, EOS, then padding."""
        texts = self._check_list([prompts] if isinstance(prompts, str) else prompts)
        n = self._model_max_length
        rows = []
        for encoding in self._tok.encode_batch(texts, add_special_tokens=False):
            ids = encoding.ids[: n - 2]  # truncation keeps the first tokens; EOS stays last
            rows.append([self.bos_id, *ids, self.eos_id] + [self.pad_id] * (n - 2 - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # (B, 77)

    def encode(self, text: str) -> list[int]:
        """The ids of one text without BOS/EOS, untruncated (for prompts longer than 75 tokens)."""
        self._check_text(text, "text")
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize(self, text: str) -> list[str]:
        """The BPE pieces of one text, e.g. 'a dog' -> ['a</w>', 'dog</w>']."""
        self._check_text(text, "text")
        return self._tok.encode(text, add_special_tokens=False).tokens

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Ids -> text, as transformers decodes: `</w>` becomes a space, the result is stripped."""
        if isinstance(ids, torch.Tensor):
            if ids.ndim != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
                raise ValueError(f"CLIPTokenizer.decode: ids must be a 1-D integer tensor, got {ids.dtype} "
                                 f"{tuple(ids.shape)}")
            ids = ids.tolist()
        ids = list(ids)
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < self.vocab_size:
                raise ValueError(f"CLIPTokenizer.decode: id {i!r} is not an int in [0, {self.vocab_size})")
        text = self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()

    @staticmethod
    def _check_text(text: Any, name: str) -> None:
        if not isinstance(text, str):
            raise TypeError(f"CLIPTokenizer: {name} must be a str, got {type(text).__name__}")
        try:  # lone surrogates (undecodable bytes from a command line) are not text the tokenizer can take
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"CLIPTokenizer: {name} is not valid Unicode text (character {e.start}: "
                             f"{text[e.start]!r})") from None

    def _check_list(self, prompts: Any) -> list[str]:
        if not isinstance(prompts, Sequence) or isinstance(prompts, bytes):
            raise TypeError(f"CLIPTokenizer: prompts must be a str or a list of str, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("CLIPTokenizer: prompts is an empty list; give at least one prompt (\"\" is allowed)")
        for i, text in enumerate(prompts):
            self._check_text(text, f"prompts[{i}]")
        return list(prompts)

    # ---------------------------------------------------------------------------------------------------------
    # Properties

    @property
    def bos_id(self) -> int:
        return self._ids["bos_token"]  # 49406

    @property
    def eos_id(self) -> int:
        return self._ids["eos_token"]  # 49407

    @property
    def pad_id(self) -> int:
        return self._ids["pad_token"]  # 49407 (SD 1) or 0 (SD 2)

    @property
    def model_max_length(self) -> int:
        return self._model_max_length  # 77

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)  # 49408

    def __repr__(self) -> str:
        return (f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length}, "
                f"pad={self.special_tokens['pad_token']!r} ({self.pad_id}))")
