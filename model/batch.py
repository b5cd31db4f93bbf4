"""The running batch of the local backend: rows that decode together, one token per step.

A `Batch` holds what the next forward of each row needs: the row's keys and values in a left-padded
KV cache, the attention mask, the token to feed and its position, and what the row's images give
its decoding steps (`RowImages`, which the model's family makes: for IDEFICS v1 the perceiver states,
computed once per request by the family's `encode`, with the image mask of its last prompt token; nothing
for Idefics3, whose images live in the prompt's embeddings and so in the cache).
Rows join by being prefilled as a batch of their own and `concatenate`d into the running one; they
leave through `select`, which also trims padding nobody needs any more, so a finished row stops
costing compute at once. This is the design of TGI's `IdeficsCausalLMBatch` (filter / concatenate),
written for transformers' `DynamicCache`.

Every row keeps `generate`'s rules, so a greedy row's tokens are those of the same prompt run alone
(in fp32, where a row's logits stay within about 1e-5 of its solo run's; in bfloat16 even `generate`'s own
batches differ from solo runs): position ids count the row's own tokens, decoding reuses the image
mask of the last prompt token, logits are processed in
fp32 in `generate`'s order (repetition penalty, banned tokens, the row's own processors, then
temperature, top-k and top-p for sampled rows). Everything stays on the model's device; `choose` makes the
one host copy of a step (the chosen tokens).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import InitVar, dataclass, field
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from transformers import DynamicCache, LogitsProcessor
from transformers.cache_utils import DynamicLayer

from model.beams import BeamSearch


@dataclass(frozen=True)
class Sampling:
    """How a row picks its tokens; `seed` makes a sampled row reproducible (None: a random one)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    top_k: int = 50  # generate's default: a sampled row keeps its 50 likeliest tokens (0: all)


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the model: token ids, which images each token sees, the images' states."""

    ids: list[int]
    image_mask: torch.Tensor  # (len(ids), images) bool; IDEFICS v1 only (Idefics3: no columns)
    # IDEFICS v1: (images, states, hidden), perceiver (or vision encoder) output. Idefics3: (image
    # tokens, hidden), the connector's output for the prompt's <image> tokens in order.
    images: torch.Tensor | None


@dataclass(eq=False)
class Row:
    """One request in a batch: its tokens so far (prompt and reply), its images and how it samples.

    The last token of `ids` is the one the next forward feeds (not in the cache yet), except before
    the row's first prefill. `owner` is whoever asked; the batch never looks at it. A row of a beam
    search (`beams`) gets its tokens from the search, with the other beams of its request.
    """

    owner: Any
    prompt: Prompt
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    processors: Sequence[LogitsProcessor] = ()
    cached: int = 0  # this row's tokens in the cache (its rightmost columns)
    generator: torch.Generator | None = None
    beams: BeamSearch | None = None
    # Tokens after the prompt the row starts with (a scoring's continuations, packed: model/scoring.py).
    said: InitVar[Sequence[int]] = ()
    _own_ids: list[int] = field(init=False, repr=False)  # `ids` of a row outside a search (it appends to them)
    _buffer: torch.Tensor | None = field(default=None, repr=False)  # `ids` as a tensor, filled on demand
    _filled: int = 0

    def __post_init__(self, said: Sequence[int]) -> None:
        self._own_ids = [*self.prompt.ids, *said]

    @property
    def ids(self) -> list[int]:
        """The row's tokens so far, prompt and reply. A beam's are read from its search when asked
        (for a prefill after the row waited): the search rewrites whole beams at its steps."""
        if self.beams is not None and self.beams.started:
            return self.beams.beam_ids(self.beams.rows.index(self))
        return self._own_ids

    @property
    def images(self) -> int:
        return 0 if self.prompt.images is None else self.prompt.images.shape[0]

    @property
    def generated(self) -> int:
        return len(self.ids) - len(self.prompt.ids)

    @property
    def peak_tokens(self) -> int:
        """The most cache this row can need: its prompt and its whole reply."""
        return len(self.prompt.ids) + self.max_new_tokens

    def tokens(self, device: torch.device) -> torch.Tensor:
        """`ids` of a row outside a beam search as a tensor on `device` (for repetition penalties and the
        row's processors), kept up to date a few tokens at a time instead of converted whole at every step."""
        if self._buffer is None or self._buffer.device != device:
            self._buffer = torch.empty(self.peak_tokens + 1, dtype=torch.long, device=device)
            self._filled = 0
        ids = self._own_ids
        if self._filled < len(ids):
            self._buffer[self._filled : len(ids)] = torch.tensor(ids[self._filled :])
            self._filled = len(ids)
        return self._buffer[: len(ids)]

    def image_mask(self) -> torch.Tensor:
        """The image mask of every token in `ids`: the prompt's, then the last prompt token's again for
        each reply token (what `generate` does while decoding)."""
        mask = self.prompt.image_mask
        extra = len(self.ids) - mask.shape[0]
        return torch.cat([mask, mask[-1:].expand(extra, -1)]) if extra else mask


def footprint(rows: Sequence[Row]) -> int:
    """Cache rows x tokens the rows may need together at most (padding included): every row padded to
    the longest peak. `select` trims padding as rows leave, so the cache never exceeds this."""
    return len(rows) * max((row.peak_tokens for row in rows), default=0)


class RowImages(Protocol):
    """What a batch's rows need of their images when they are fed more tokens, in the model family's
    own form (model/family.py makes it at the prefill): rows leave and join through `select` and `concatenate`."""

    def step_inputs(self, model, width: int = 1) -> dict[str, Any]:
        """The forward's image arguments for feeding every row `width` more tokens (a decoding step: one)."""
        ...

    def select(self, index: torch.Tensor, rows: Sequence[Row]) -> RowImages:
        """The images of the rows at `index` (which are now `rows`)."""
        ...

    def concatenate(self, others: Sequence[RowImages]) -> RowImages:
        """This batch's rows' images followed by those of `others`, in order."""
        ...


class PrefillInputs(Protocol):
    """A model family's side of a prefill: the forward's token and image arguments for left-padded
    rows, and what the rows keep of their images for decoding."""

    def prefill_inputs(self, model, rows: Sequence[Row], ids: torch.Tensor) -> tuple[dict[str, Any], RowImages]: ...


@dataclass(frozen=True)
class PrefillForward:
    """The inputs and output of one prefill: `ids` and `attention_mask` (rows, longest) left-padded,
    what the rows keep of their images (the family's `RowImages`), and the model's output."""

    ids: torch.Tensor
    attention_mask: torch.Tensor
    images: RowImages
    output: Any


def prefill_forward(
    model, rows: Sequence[Row], family: PrefillInputs, pad_id: int, keep: int = 1, packed: tuple[torch.Tensor, torch.Tensor] | None = None
) -> PrefillForward:
    """One forward of the rows' tokens so far, left-padded, with a fresh cache; logits of the last
    `keep` positions. `family` (model/family.py) gives the forward the rows' images in the model's own form.

    `packed`, a 4D attention mask (rows, 1, tokens, tokens), additive in the model's dtype, and the
    position ids (rows, tokens), lays out rows that each pack several sequences (model/scoring.py)
    instead of causally: such a forward keeps no cache, since nothing decodes after it."""
    device = model.device
    longest = max(len(row.ids) for row in rows)
    ids = torch.tensor([[pad_id] * (longest - len(row.ids)) + row.ids for row in rows], device=device)
    lengths = torch.tensor([len(row.ids) for row in rows], device=device)
    attention_mask = (torch.arange(longest, device=device) >= longest - lengths[:, None]).long()
    inputs, images = family.prefill_inputs(model, rows, ids)
    if packed is None:
        # generate's rule: positions count the row's own tokens; padding sits at 0.
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        output = _forward(model, attention_mask, position_ids, DynamicCache(config=model.config), keep, **inputs)
    else:
        output = _forward(model, *packed, None, keep, **inputs)
    return PrefillForward(ids, attention_mask, images, output)


class Batch:
    """Rows decoding together. Build with `prefill`, advance with `decode` and `choose`, shrink with
    `select`, merge with `concatenate` (a batch's rows never change: those make new batches).
    `logits` holds each row's next-token logits after a forward."""

    def __init__(
        self,
        rows: list[Row],
        cache: DynamicCache,
        attention_mask: torch.Tensor,  # (rows, cache length) long
        positions: torch.Tensor,  # (rows,) position id of the token to feed
        next_ids: torch.Tensor,  # (rows,) token to feed
        images: RowImages,  # what each row's decoding steps need of its images
        logits: torch.Tensor | None,
    ):
        self.rows = rows
        self.cache = cache
        self.attention_mask = attention_mask
        self.positions = positions
        self.next_ids = next_ids
        self.images = images
        self.logits = logits
        self._plan: _Plan | None = None  # what `choose` does with each row, worked out at its first call
        self._banned: tuple[tuple[int, ...], torch.Tensor] | None = None  # the banned ids, and as an index

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def length(self) -> int:
        """Columns of the cache (the longest row; shorter rows are padded on the left)."""
        return self.attention_mask.shape[1]

    # -- forwards ------------------------------------------------------------------------------

    @classmethod
    def prefill(cls, model, rows: list[Row], family: PrefillInputs, pad_id: int) -> Batch:
        """Run the rows' tokens so far (left-padded) through the model: a new batch with their logits.
        `family` (model/family.py) gives the forward the rows' images in the model's own form."""
        forward = prefill_forward(model, rows, family, pad_id)
        for row in rows:
            row.cached = len(row.ids)
        return cls(
            rows=list(rows),
            cache=forward.output.cache,
            attention_mask=forward.attention_mask,
            positions=forward.attention_mask.sum(-1),
            next_ids=forward.ids[:, -1],
            images=forward.images,
            logits=forward.output.logits[:, -1].float(),
        )

    def decode(self, model) -> None:
        """Feed every row its next token: one forward, the cache one column longer, new `logits`.

        If the forward raises, the batch is left as it was (layers that already took the new column
        give it back), so it can be stepped again, split, or shrunk."""
        length = self.length
        attention_mask = F.pad(self.attention_mask, (0, 1), value=1)
        try:
            output = _forward(
                model, attention_mask, self.positions[:, None], self.cache, input_ids=self.next_ids[:, None], **self.images.step_inputs(model)
            )
        except BaseException:
            for layer, (keys, values) in zip(self.cache.layers, _tensors(self.cache)):
                if keys.shape[-2] > length:  # this layer took the new column before the failure
                    cast("DynamicLayer", layer).keys, cast("DynamicLayer", layer).values = keys[..., :length, :], values[..., :length, :]
            raise
        self.attention_mask = attention_mask
        self.positions = self.positions + 1
        for row in self.rows:
            row.cached += 1
        self.logits = output.logits[:, -1].float()

    @torch.inference_mode()
    def choose(self, banned: Sequence[int]) -> tuple[list[int], dict[int, Exception]]:
        """Pick every row's next token from `logits` by its own settings; it becomes the token to feed.

        Returns the tokens (on the host: the step's one sync) and the rows whose own logits
        processors raised, by index; those rows get no token and should leave the batch."""
        assert self.logits is not None, "choose follows a forward"
        scores = self.logits
        if self._plan is None:
            self._plan = _Plan.of(self.rows, scores)
        plan = self._plan
        beam_logits = [scores.index_select(0, part.index) for part in plan.searches]  # before anything shapes them
        for index in plan.penalized:
            row = self.rows[index]
            penalty = row.sampling.repetition_penalty
            seen = row.tokens(scores.device)
            picked = scores[index].gather(0, seen)
            scores[index].scatter_(0, seen, torch.where(picked < 0, picked * penalty, picked / penalty))
        scores.index_fill_(1, self._banned_index(banned, scores.device), -float("inf"))
        failed: dict[int, Exception] = {}
        for index in plan.processed:
            row = self.rows[index]
            for processor in row.processors:
                try:
                    scores[index : index + 1] = processor(row.tokens(scores.device)[None], scores[index : index + 1])
                except Exception as exc:  # a row's own processor fails that row only
                    failed[index] = exc
        tokens = scores.argmax(-1)
        if plan.sampled is not None:
            tokens[plan.sampled.index] = plan.sampled.draw(scores)
        for part, logits in zip(plan.searches, beam_logits):
            try:
                self._search(part, logits, tokens)
            except Exception as exc:  # a search that fails (a beam lost, a processor raising) fails its request
                failed.update((index, exc) for index in part.indices)
        self.next_ids = tokens
        self.logits = None
        chosen = tokens.tolist()
        for index in plan.own:
            if index not in failed:
                self.rows[index]._own_ids.append(chosen[index])
        return chosen, failed

    def _banned_index(self, banned: Sequence[int], device: torch.device) -> torch.Tensor:
        """`banned` as an index on `device`, made once for the ids the backend bans at every step."""
        key = tuple(banned)
        if self._banned is None or self._banned[0] != key:
            self._banned = key, torch.tensor(key, dtype=torch.long, device=device)
        return self._banned[1]

    def _search(self, part: _SearchRows, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """A step of a search whose beams are the rows `part.indices` (in beam order): each beam row
        takes its parent's cache, and its new token."""
        if len(part.indices) != part.search.num_beams:
            raise RuntimeError("a beam of this search left the batch")
        parents, chosen = part.search.step(logits)
        tokens[part.index] = chosen
        moves = [(part.indices[beam], part.indices[parent]) for beam, parent in enumerate(parents) if parent != beam]
        if moves:
            self._copy_rows(moves)

    def _copy_rows(self, moves: list[tuple[int, int]]) -> None:
        """Each (target, source) row of the cache takes the source's keys and values, as they were
        before any of the moves."""
        layers = _tensors(self.cache)
        targets, sources = [target for target, _ in moves], [source for _, source in moves]
        if not set(targets) & set(sources):  # the usual case: a row copy each, no index
            for keys, values in layers:
                for target, source in moves:
                    keys[target].copy_(keys[source])
                    values[target].copy_(values[source])
            return
        to, of = torch.tensor(targets, device=self.attention_mask.device), torch.tensor(sources, device=self.attention_mask.device)
        for keys, values in layers:
            keys[to.to(keys.device)] = keys[of.to(keys.device)]
            values[to.to(values.device)] = values[of.to(values.device)]

    # -- joining and leaving -------------------------------------------------------------------

    @torch.inference_mode()
    def select(self, keep: Sequence[int]) -> Batch:
        """A batch of the rows at `keep` (in that order), without the padding and image slots only
        the others needed."""
        device = self.attention_mask.device
        index = torch.tensor(list(keep), device=device)
        rows = [self.rows[position] for position in keep]
        cut = self.length - max(row.cached for row in rows)
        cache = _cache_of([(keys[index.to(keys.device), :, cut:], values[index.to(values.device), :, cut:]) for keys, values in _tensors(self.cache)])
        return Batch(
            rows=rows,
            cache=cache,
            attention_mask=self.attention_mask[index, cut:],
            positions=self.positions[index],
            next_ids=self.next_ids[index],
            images=self.images.select(index, rows),
            logits=None if self.logits is None else self.logits[index],
        )

    def split(self) -> tuple[Batch, Batch]:
        """The first and second half of the rows, as two batches."""
        middle = len(self.rows) // 2
        return self.select(range(middle)), self.select(range(middle, len(self.rows)))

    @staticmethod
    @torch.inference_mode()
    def concatenate(batches: Sequence[Batch]) -> Batch:
        """One batch of all the rows, in order: shorter caches padded on the left."""
        if len(batches) == 1:
            return batches[0]
        length = max(batch.length for batch in batches)

        def left(tensor: torch.Tensor, batch: Batch, dim: int) -> torch.Tensor:
            # F.pad counts dimensions from the last one, two numbers each.
            padding = [0, 0] * (tensor.dim() - 1 - dim) + [length - batch.length, 0]
            return F.pad(tensor, padding)

        per_batch = [_tensors(batch.cache) for batch in batches]
        layers = [
            (
                torch.cat([left(tensors[number][0], batch, 2) for batch, tensors in zip(batches, per_batch)]),
                torch.cat([left(tensors[number][1], batch, 2) for batch, tensors in zip(batches, per_batch)]),
            )
            for number in range(len(per_batch[0]))
        ]
        logits = [batch.logits for batch in batches]
        return Batch(
            rows=[row for batch in batches for row in batch.rows],
            cache=_cache_of(layers),
            attention_mask=torch.cat([left(batch.attention_mask, batch, 1) for batch in batches]),
            positions=torch.cat([batch.positions for batch in batches]),
            next_ids=torch.cat([batch.next_ids for batch in batches]),
            images=batches[0].images.concatenate([batch.images for batch in batches[1:]]),
            logits=None if any(part is None for part in logits) else torch.cat(logits),  # type: ignore[arg-type]
        )


@dataclass(frozen=True)
class _SearchRows:
    """The rows of a beam search in a batch, in beam order, and as an index on the model's device."""

    search: BeamSearch
    indices: list[int]
    index: torch.Tensor


class _SampledRows:
    """The sampled rows of a batch and their settings as tensors, made once: at each step, temperature,
    then top-k, then top-p (transformers' warpers, in generate's order), then one draw per row from
    its own generator."""

    def __init__(self, rows: list[Row], indices: list[int], vocabulary: int, device: torch.device):
        self.rows = rows
        self.index = torch.tensor(indices, device=device)
        self.temperature = torch.tensor([row.sampling.temperature for row in rows], device=device)[:, None]
        self.top_p = torch.tensor([row.sampling.top_p for row in rows], device=device)[:, None]
        top_k = [min(row.sampling.top_k or vocabulary, vocabulary) for row in rows]
        self.top_k = torch.tensor(top_k, device=device)[:, None]
        self.most = max(top_k)

    def draw(self, scores: torch.Tensor) -> torch.Tensor:
        """A token for each sampled row from the batch's processed `scores`.

        Top-k needs only each row's k-th largest score, which a top-k selection finds without sorting
        the vocabulary; top-p sorts the scores top-k left, as transformers' warper does (sorting once
        for both would order tied scores differently, and so change some draws)."""
        scores = scores.index_select(0, self.index) / self.temperature
        kth = torch.topk(scores, self.most).values.gather(1, self.top_k - 1)
        scores = scores.masked_fill(scores < kth, -float("inf"))
        ordered, order = scores.sort(dim=-1)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - self.top_p
        drop[:, -1] = False  # keep at least the likeliest token
        probabilities = scores.masked_fill(drop.scatter(1, order, drop), -float("inf")).softmax(-1)
        draws = []
        for index, row in enumerate(self.rows):
            if row.generator is None:
                row.generator = torch.Generator(device=scores.device)
                row.generator.manual_seed(row.sampling.seed if row.sampling.seed is not None else random.getrandbits(63))
            draws.append(torch.multinomial(probabilities[index], 1, generator=row.generator))
        return torch.cat(draws)


@dataclass(frozen=True)
class _Plan:
    """What `Batch.choose` does with each row, by index: worked out once per batch, whose rows never change."""

    own: list[int]  # rows outside beam searches: they take the chosen token into their `ids`
    penalized: list[int]  # of those, the rows with a repetition penalty
    processed: list[int]  # and those with processors of their own
    sampled: _SampledRows | None
    searches: list[_SearchRows]

    @classmethod
    def of(cls, rows: list[Row], scores: torch.Tensor) -> _Plan:
        own = [index for index, row in enumerate(rows) if row.beams is None]
        sampled = [index for index in own if rows[index].sampling.do_sample]
        beams: dict[BeamSearch, list[int]] = {}
        for index, row in enumerate(rows):
            if row.beams is not None:
                beams.setdefault(row.beams, []).append(index)
        searches = []
        for search, indices in beams.items():
            indices.sort(key=lambda index: search.rows.index(rows[index]))
            searches.append(_SearchRows(search, indices, torch.tensor(indices, device=scores.device)))
        return cls(
            own=own,
            penalized=[index for index in own if rows[index].sampling.repetition_penalty != 1.0],
            processed=[index for index in own if rows[index].processors],
            sampled=_SampledRows([rows[index] for index in sampled], sampled, scores.shape[-1], scores.device) if sampled else None,
            searches=searches,
        )


def _tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's (keys, values), (rows, heads, tokens, dim). IDEFICS' layers are all full-attention
    `DynamicLayer`s, initialized by the prefill."""
    layers = cast("list[DynamicLayer]", cache.layers)
    return [(cast("torch.Tensor", layer.keys), cast("torch.Tensor", layer.values)) for layer in layers]


def _cache_of(layers: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A cache holding `layers` (keys, values), without copying them."""
    cache = DynamicCache()
    cache.layers = []
    for keys, values in layers:
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        cache.layers.append(layer)
    return cache


def _forward(model, attention_mask, position_ids, cache: DynamicCache | None, keep: int = 1, **inputs):
    """One forward of the language model, logits of the last `keep` positions, filling `cache` (None:
    keeping no keys and values); `inputs` are the tokens (ids or embeddings) and the images in the
    family's form (precomputed states: the vision encoder never runs here)."""
    with torch.inference_mode():
        return model(attention_mask=attention_mask, position_ids=position_ids, cache=cache, use_cache=cache is not None, logits_to_keep=keep, **inputs)
