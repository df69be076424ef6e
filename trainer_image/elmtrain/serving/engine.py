"""The decoding engine: one thread that runs every model, so requests batch together.

Each loop: admit waiting completions (read their prompts, route them), then one token for every
active sequence. A sequence routed to experts {a, b} sits in a's and b's decode batches; each
model runs once per step for all the sequences that use it, whatever else they use, and each
sequence mixes its experts' next-token laws by its posterior (Bayes rule, updated as its context
grows). A completion routed by cluster (``Completion.cluster_weights``, c-BTM) takes the top-k
experts by its prompt's cluster weights instead, mixed by those weights throughout; only they
read its prompt.

Completions carry the model set they were admitted under: a swap sends new ones to the new set
while running ones finish on theirs; an old set is dropped once nothing uses it.

One request never harms another: whatever fails while starting or decoding a sequence fails
that sequence alone (``Failed``). Work done for many at once (reading prompts together, drawing
tokens together, a model's forward pass over its batch) is redone one sequence at a time when
it fails, so that only the sequence it fails for is dropped.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch

from elmtrain.scoring.logprobs import log_posterior, route
from elmtrain.serving.completion import Completion, Done, Failed, Routed, Text, Update
from elmtrain.serving.kvbatch import DecodeBatch, Prefill, concat, prefill
from elmtrain.serving.modelset import (
    AVERAGE,
    ENSEMBLE,
    EXPERT,
    SEED,
    Member,
    ModelSet,
    member_label,
)
from elmtrain.serving.sampling import TextStream, sample

log = structlog.get_logger(__name__)
SEEDS = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


@dataclass(eq=False)
class _Sequence:
    completion: Completion
    members: list[Member]
    log_prior: torch.Tensor  # [k] over members
    context_loglik: torch.Tensor  # [k]: log p_j(tokens so far)
    next_logp: torch.Tensor  # [k, V]
    text: TextStream
    generator: torch.Generator
    generated: int = 0
    token: int | None = None  # sampled, not yet fed
    slot: dict[str, int] = field(default_factory=dict)  # member key -> its row in next_logp
    fixed: bool = False  # routed by cluster: the weights stay the prompt's (no Bayes update)

    def __post_init__(self) -> None:
        self.slot = {member.key: i for i, member in enumerate(self.members)}


@dataclass(frozen=True)
class _BatchKey:
    """A decode batch: one member of one model set."""

    model_set: int  # id() of the ModelSet
    member: str  # Member.key


@dataclass
class _ExpertReads:
    """The routed completions' prompts as one expert read them, in one forward pass."""

    prefill: Prefill
    rows: dict[int, int]  # id(completion) -> its row in ``prefill``

    def of(self, completion: Completion) -> Prefill:
        return self.prefill.select([self.rows[id(completion)]])


@dataclass
class _Posterior:
    """One routed completion's view of the experts it allows: their reads of its prompt and
    the log posterior over them (the prior renormalised over them, by Bayes' rule)."""

    allowed: list[int]  # indices into ModelSet.experts
    reads: list[Prefill]  # per allowed expert
    log_posterior: torch.Tensor  # [len(allowed)]


@dataclass
class _Route:
    """Where one completion decodes: its members with their reads of its prompt, the prior over
    them, and what the answer reports (the experts and their weights)."""

    members: list[Member]
    reads: list[Prefill]
    log_prior: torch.Tensor  # [k] float64
    routing: list[dict[str, Any]]
    fixed: bool = False  # routed by cluster: ``log_prior`` is the weights, never updated


@dataclass
class _Started:
    sequence: _Sequence
    reads: list[Prefill]  # per member: the cache rows it joins the member's batch with
    routing: list[dict[str, Any]]


Hook = Callable[[str, Any], None]  # (what, value): the server's metrics


def _step_batch(batch: DecodeBatch[_Sequence], tokens: list[int]) -> torch.Tensor | Exception:
    """One batch's forward pass (on a lane); a failure is returned, so that the others' steps
    are still collected and only this batch is retried apart."""
    try:
        return batch.step(tokens)
    except Exception as error:
        return error


INLINE, LANES = "inline", "lanes"


class _ModeChooser:
    """Which way to step several models is faster here, learnt as it serves: small models
    gain from running side by side on a core each, large ones from every core in each matmul.
    Mostly the faster mode (by the running mean of seconds per sequence), now and then the
    other, in case the load changed."""

    EXPLORE_EVERY = 32

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.steps = 0

    def choose(self) -> str:
        self.steps += 1
        untried = [m for m in (LANES, INLINE) if m not in self.seconds]
        if untried:
            return untried[0]
        best = min(self.seconds, key=self.seconds.__getitem__)
        if self.steps % self.EXPLORE_EVERY == 0:
            return LANES if best == INLINE else INLINE
        return best

    def observe(self, mode: str, seconds_per_row: float) -> None:
        previous = self.seconds.get(mode)
        self.seconds[mode] = (
            seconds_per_row if previous is None else 0.8 * previous + 0.2 * seconds_per_row
        )


def _weight(member: Member, weight: float) -> dict[str, Any]:
    return {"expert": member.domain or SEED, "version": member.version, "weight": weight}


class Engine:
    def __init__(
        self,
        top_k: int,
        max_active: int = 64,
        hook: Hook | None = None,
        lanes: int | None = None,
    ) -> None:
        self.top_k, self.max_active = top_k, max_active
        # Decode batches of different models run on this many threads (default: the cores).
        self._cores = len(os.sched_getaffinity(0))
        self._lanes = ThreadPoolExecutor(lanes or self._cores, thread_name_prefix="lane")
        self._intra_op = torch.get_num_threads()
        self._modes = _ModeChooser()
        # Unbounded: the HTTP side's admission (serving/admission.py) bounds what is in flight.
        self._inbox: queue.SimpleQueue[Completion] = queue.SimpleQueue()
        self._active: list[_Sequence] = []
        self._batches: dict[_BatchKey, DecodeBatch[_Sequence]] = {}
        self._hook = hook or (lambda what, value: None)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._rng = random.Random()

    # ---- the HTTP side --------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._lanes.shutdown(wait=False)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def active(self) -> int:
        """Sequences decoding now (read across threads: a snapshot)."""
        return len(self._active)

    def submit(self, completion: Completion) -> None:
        self._inbox.put(completion)

    # ---- the engine thread ----------------------------------------------------------------

    def _threads(self, count: int) -> None:
        """torch's threads inside one operation (process-wide: changed only when it must)."""
        if count != self._intra_op:
            torch.set_num_threads(count)
            self._intra_op = count

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                admitted = self._admit()
                with torch.inference_mode():
                    if admitted:
                        self._start(admitted)
                    if self._active:
                        self._step()
            except Exception as error:  # a bug outside any one sequence's work: the last resort
                log.exception("serve.engine_failed")
                for sequence in self._active:
                    self._fail(sequence, error)
                self._active, self._batches = [], {}

    def _admit(self) -> list[Completion]:
        room = self.max_active - len(self._active)
        admitted: list[Completion] = []
        wait = room > 0 and not self._active  # idle: wait for work
        while len(admitted) < room:
            try:
                completion = self._inbox.get(timeout=0.2) if wait else self._inbox.get_nowait()
            except queue.Empty:
                break
            wait = False
            if not completion.cancelled.is_set():  # gone while it waited: costs nothing
                admitted.append(completion)
        return admitted

    def _tell(self, completion: Completion, update: Update) -> None:
        """Hand an update over; a hand-over that fails (the server is shutting down) is the
        caller's to act on for this completion alone."""
        completion.emit(update)

    def _fail(self, sequence: _Sequence | Completion, error: BaseException) -> None:
        completion = sequence.completion if isinstance(sequence, _Sequence) else sequence
        log.warning("serve.completion_failed", error=repr(error)[:500])
        completion.cancelled.set()
        try:
            self._tell(completion, Failed(f"generation failed: {error}"))
        except Exception:  # nobody left to tell
            log.warning("serve.tell_failed", exc_info=True)

    def _batch(self, key: _BatchKey, model_set: ModelSet, member: Member) -> DecodeBatch[_Sequence]:
        if key not in self._batches:
            self._batches[key] = DecodeBatch(member.model, model_set.runtime.device)
        return self._batches[key]

    # ---- starting: read the prompts, route, join the batches ------------------------------

    def _start(self, completions: list[Completion]) -> None:
        by_set: dict[int, list[Completion]] = {}
        for completion in completions:
            by_set.setdefault(id(completion.model_set), []).append(completion)
        for group in by_set.values():
            model_set = group[0].model_set
            try:
                started = self._prepare(model_set, group)
            except Exception as error:
                if len(group) == 1:
                    self._fail(group[0], error)
                    continue
                started = []  # one of them may be the cause: each alone, so only it fails
                for completion in group:
                    try:
                        started += self._prepare(model_set, [completion])
                    except Exception as alone:
                        self._fail(completion, alone)
            self._join(model_set, started)

    def _prepare(self, model_set: ModelSet, group: list[Completion]) -> list[_Started]:
        """Read the prompts (on every expert, where routing needs the posterior) and route
        each; the engine's state is not touched, so a failure here can be retried apart."""
        routed = [c for c in group if c.target.kind in (ENSEMBLE, AVERAGE)]
        reads: dict[str, _ExpertReads] = {}
        if routed:  # each expert reads the prompts that allow it, to route them (all cores)
            self._threads(self._cores)
            allowed = [set(self._readers(c)) for c in routed]
            for index, member in enumerate(model_set.experts):
                readers = [c for c, its in zip(routed, allowed, strict=True) if index in its]
                if readers:  # an expert every one of them opted out of does not run
                    rows = {id(c): row for row, c in enumerate(readers)}
                    prompts = self._prefill(model_set, member, readers)
                    reads[member.key] = _ExpertReads(prompts, rows)
        started = []
        for completion in group:
            kind = completion.target.kind
            if kind == ENSEMBLE:
                where = self._route_ensemble(completion, model_set, reads)
            elif kind == AVERAGE:
                where = self._route_average(completion, model_set, reads)
            else:
                where = self._route_single(completion, model_set)
            started.append(_Started(self._sequence(completion, where), where.reads, where.routing))
        return started

    def _readers(self, completion: Completion) -> tuple[int, ...]:
        """The experts that read a routed completion's prompt: those it allows (for the
        posterior); routed by cluster, only the chosen ones (the ensemble) or none (the
        average, which reads the prompt itself)."""
        if completion.cluster_weights is None:
            return completion.allowed
        if completion.target.kind == AVERAGE:
            return ()
        return tuple(self._cluster_choice(completion))

    def _cluster_choice(self, completion: Completion) -> list[int]:
        """The top-k experts (indices, ascending) by the prompt's cluster weights."""
        weights = completion.cluster_weights or ()
        allowed = [i for i in completion.allowed if weights[i] > 0]
        chosen = route(torch.tensor([weights[i] for i in allowed], dtype=torch.float64), self.top_k)
        return [allowed[i] for i in chosen]

    def _prefill(self, model_set: ModelSet, member: Member, group: list[Completion]) -> Prefill:
        self._hook("prefill", len(group))
        self._hook("forward", member.label)
        return prefill(member.model, [c.prompt_ids for c in group], model_set.runtime.device)

    def _posterior(
        self, completion: Completion, model_set: ModelSet, reads: dict[str, _ExpertReads]
    ) -> _Posterior:
        allowed = list(completion.allowed)
        states = [reads[model_set.experts[i].key].of(completion) for i in allowed]
        loglik = torch.cat([s.prompt_loglik for s in states])
        return _Posterior(
            allowed, states, log_posterior(loglik, model_set.log_prior[allowed].exp())
        )

    def _route_ensemble(
        self, completion: Completion, model_set: ModelSet, reads: dict[str, _ExpertReads]
    ) -> _Route:
        """The top-k experts by the prompt's posterior decode together, mixed by it (or, routed
        by cluster, by the prompt's cluster weights)."""
        if completion.cluster_weights is not None:
            chosen_experts = self._cluster_choice(completion)
            kept = torch.tensor(
                [completion.cluster_weights[i] for i in chosen_experts], dtype=torch.float64
            )
            kept = kept / kept.sum()
            members = [model_set.experts[i] for i in chosen_experts]
            states = [reads[m.key].of(completion) for m in members]
            routing = [_weight(m, round(float(w), 6)) for m, w in zip(members, kept, strict=True)]
            return _Route(members, states, torch.log(kept), routing, fixed=True)
        seen = self._posterior(completion, model_set, reads)
        allowed, states = seen.allowed, seen.reads
        chosen = route(seen.log_posterior.exp(), self.top_k)  # positions in ``allowed``
        prior = model_set.log_prior[[allowed[i] for i in chosen]]
        loglik = torch.cat([states[i].prompt_loglik for i in chosen])
        weights = log_posterior(loglik, prior.exp()).exp().tolist()
        members = [model_set.experts[allowed[i]] for i in chosen]
        routing = [_weight(m, round(float(w), 6)) for m, w in zip(members, weights, strict=True)]
        return _Route(members, [states[i] for i in chosen], prior.double(), routing)

    def _route_average(
        self, completion: Completion, model_set: ModelSet, reads: dict[str, _ExpertReads]
    ) -> _Route:
        """One model, the experts' parameters averaged by the prompt's posterior (or its cluster
        weights), decodes."""
        if completion.cluster_weights is not None:
            allowed = list(completion.allowed)
            given = torch.tensor([completion.cluster_weights[i] for i in allowed])
            log_weights = torch.log(given.double())
        else:
            seen = self._posterior(completion, model_set, reads)
            allowed, log_weights = seen.allowed, seen.log_posterior
        weights = model_set.average_weights(log_weights, self.top_k)  # by position
        mix = {allowed[i]: w for i, w in weights.items()}
        member = model_set.average(mix)
        routing = [_weight(model_set.experts[i], round(w, 6)) for i, w in mix.items()]
        read = self._prefill(model_set, member, [completion])
        return _Route([member], [read], torch.zeros(1, dtype=torch.float64), routing)

    def _route_single(self, completion: Completion, model_set: ModelSet) -> _Route:
        """An expert, the seed or the mix alone."""
        target = completion.target
        member = model_set.single(target)
        routing = [_weight(member, 1.0)] if target.kind == EXPERT else []
        read = self._prefill(model_set, member, [completion])
        return _Route([member], [read], torch.zeros(1, dtype=torch.float64), routing)

    def _sequence(self, completion: Completion, where: _Route) -> _Sequence:
        seed = completion.seed if completion.seed is not None else self._rng.getrandbits(63)
        context = torch.cat([s.prompt_loglik for s in where.reads])
        return _Sequence(
            completion=completion,
            members=where.members,
            log_prior=where.log_prior,
            context_loglik=torch.zeros_like(context) if where.fixed else context,
            next_logp=torch.cat([s.next_logp for s in where.reads]),
            text=TextStream(completion.model_set.tokenizer, completion.stop),
            generator=torch.Generator().manual_seed(seed % SEEDS),
            fixed=where.fixed,
        )

    def _join(self, model_set: ModelSet, started: list[_Started]) -> None:
        """Join each new sequence to its members' decode batches (one concatenation per
        member); a sequence whose join fails leaves the batches it did join, and fails."""
        joining: dict[_BatchKey, tuple[Member, list[_Started]]] = {}
        for entry in started:
            for member in entry.sequence.members:
                key = _BatchKey(id(model_set), member.key)
                joining.setdefault(key, (member, []))[1].append(entry)
        failed: dict[_Sequence, Exception] = {}
        for key, (member, entries) in joining.items():
            try:
                rows = [e.reads[e.sequence.slot[member.key]].rows for e in entries]
                self._batch(key, model_set, member).join(
                    [e.sequence for e in entries], concat(rows)
                )
            except Exception as joined:
                failed.update((e.sequence, joined) for e in entries)
                if not self._batches.get(key, True):
                    del self._batches[key]
        for entry in started:
            sequence = entry.sequence
            if sequence in failed:
                continue
            self._active.append(sequence)
            for weight in entry.routing:
                self._hook("expert", weight["expert"])
            try:
                prompt_tokens = len(sequence.completion.prompt_ids) - 1
                self._tell(sequence.completion, Routed(entry.routing, prompt_tokens))
            except Exception as told:
                failed[sequence] = told
        for sequence, why in failed.items():
            self._fail(sequence, why)
        self._leave(list(failed))

    # ---- decoding: one token for every sequence --------------------------------------------

    def _step(self) -> None:
        """Draw one token for every sequence, then feed them all, one forward per model."""
        finished = [s for s in self._active if s.completion.cancelled.is_set()]
        live = [s for s in self._active if not s.completion.cancelled.is_set()]
        for sequence, token in zip(live, self._draw(live), strict=True):
            if token is None:  # its draw failed (and said so)
                finished.append(sequence)
                continue
            try:
                reason = self._advance(sequence, token)
                if reason is not None:
                    self._finish(sequence, reason)
            except Exception as error:  # its text, its stop sequences, its hand-over
                self._fail(sequence, error)
                finished.append(sequence)
                continue
            if reason is not None:
                finished.append(sequence)
        self._leave(finished)
        self._decode()

    def _finish(self, sequence: _Sequence, reason: str) -> None:
        completion = sequence.completion
        tail = sequence.text.finish()
        if not completion.stream:
            tail = sequence.text.text  # the whole completion, in one update
        if tail:
            self._tell(completion, Text(tail))
        prompt_tokens = len(completion.prompt_ids) - 1
        tokens = tuple(sequence.text.tokens)
        self._tell(completion, Done(reason, prompt_tokens, sequence.generated, tokens))

    def _decode(self) -> None:
        batches = list(self._batches.items())
        feeds = [[s.token or 0 for s in batch.members] for _, batch in batches]
        models = [b for _, b in batches]
        mode = self._modes.choose() if len(batches) > 1 else INLINE
        started = time.perf_counter()
        if mode == INLINE:  # one model at a time, all cores inside its operations
            self._threads(self._cores)
            steps = [_step_batch(batch, feed) for batch, feed in zip(models, feeds, strict=True)]
        else:  # models side by side, a core each: small operations spend less on threading,
            # and one model's Python overhead overlaps another's arithmetic
            self._threads(1)
            steps = list(self._lanes.map(_step_batch, models, feeds))
        if len(batches) > 1:
            rows = sum(len(feed) for feed in feeds)
            self._modes.observe(mode, (time.perf_counter() - started) / rows)
        failed: list[_Sequence] = []
        for (key, batch), feed, stepped in zip(batches, feeds, steps, strict=True):
            logp = (
                self._step_apart(batch, feed, stepped, failed)
                if isinstance(stepped, Exception)
                else stepped
            )
            self._hook("batch", len(batch))
            self._hook("forward", member_label(key.member))
            for row, sequence in enumerate(batch.members):
                sequence.next_logp[sequence.slot[key.member]] = logp[row]
        self._leave(failed)

    def _step_apart(
        self,
        batch: DecodeBatch[_Sequence],
        feed: list[int],
        error: Exception,
        failed: list[_Sequence],
    ) -> torch.Tensor:
        """A model's forward pass over its whole batch failed: step each member alone, so that
        only the members it fails for fail; the others go on in the batch, rebuilt."""
        log.warning("serve.batch_step_failed", size=len(batch), error=repr(error)[:500])
        parts: list[DecodeBatch[_Sequence]] = []
        rows: list[torch.Tensor] = []
        for row, (sequence, token) in enumerate(zip(list(batch.members), feed, strict=True)):
            try:
                alone = batch.subset([row])
                rows.append(alone.step([token]))
                parts.append(alone)
            except Exception as why:
                self._fail(sequence, why)
                failed.append(sequence)
        batch.rebuild(parts)
        if not rows:
            return torch.zeros(0)
        return torch.cat(rows)

    def _draw(self, live: list[_Sequence]) -> list[int | None]:
        """Every sequence's next token (None where drawing failed: it failed alone). Each
        draws its own uniform number first, so a retry apart draws what it would have."""
        uniforms: list[torch.Tensor | None] = []
        for sequence in live:
            try:
                uniforms.append(torch.rand(1, generator=sequence.generator))
            except Exception as error:
                self._fail(sequence, error)
                uniforms.append(None)
        drawing = [i for i, u in enumerate(uniforms) if u is not None]
        tokens: list[int | None] = [None] * len(live)
        try:
            picked = self._draw_together([live[i] for i in drawing], [uniforms[i] for i in drawing])
            for i, token in zip(drawing, picked, strict=True):
                tokens[i] = token
        except Exception:
            for i in drawing:
                try:
                    (tokens[i],) = self._draw_together([live[i]], [uniforms[i]])
                except Exception as error:
                    self._fail(live[i], error)
        return tokens

    def _draw_together(
        self, live: list[_Sequence], uniforms: list[torch.Tensor | None]
    ) -> list[int]:
        """The sequences with as many members drawn together: each mixes its members'
        next-token laws by its posterior (Bayes rule over the context so far), then samples
        with its own settings and its own uniform number."""
        tokens: dict[int, int] = {}
        groups: dict[int, list[int]] = {}
        for i, sequence in enumerate(live):
            groups.setdefault(len(sequence.members), []).append(i)
        for rows in groups.values():
            group = [live[i] for i in rows]
            joint = torch.stack([s.log_prior + s.context_loglik for s in group])  # [S, k]
            weights = (joint - torch.logsumexp(joint, dim=1, keepdim=True)).float()
            laws = torch.stack([s.next_logp for s in group])  # [S, k, V]
            mixture = torch.logsumexp(weights[:, :, None] + laws, dim=1)
            drawn = sample(
                mixture,
                torch.tensor([s.completion.temperature for s in group]),
                torch.tensor([s.completion.top_p for s in group]),
                torch.cat([u for u in (uniforms[i] for i in rows) if u is not None]),
            )
            tokens.update(zip(rows, drawn, strict=True))
        return [tokens[i] for i in range(len(live))]

    def _advance(self, sequence: _Sequence, token: int) -> str | None:
        """Take the drawn token; a finish reason if the sequence is done instead."""
        completion = sequence.completion
        if token == completion.model_set.eos:
            return "stop"
        if not sequence.fixed:  # routed by cluster: the prompt's weights throughout
            step = sequence.next_logp[:, token].double()
            sequence.context_loglik = sequence.context_loglik + step
        sequence.generated += 1
        sequence.token = token
        self._hook("token", 1)
        piece = sequence.text.add(token)
        if piece and completion.stream:
            self._tell(completion, Text(piece))
        if sequence.text.stopped:
            return "stop"
        context = len(completion.prompt_ids) + sequence.generated
        if (
            sequence.generated >= completion.max_tokens
            or context >= completion.model_set.context_length
        ):
            return "length"
        return None

    def _leave(self, finished: list[_Sequence]) -> None:
        if not finished:
            return
        gone = set(finished)
        self._active = [s for s in self._active if s not in gone]
        for key in list(self._batches):
            batch = self._batches[key]
            batch.leave(gone)
            if not batch:
                del self._batches[key]
