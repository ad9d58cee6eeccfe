"""Continuous batching: which sequences run in the next step.

Each step is either a prefill of newly admitted sequences (their whole prompt, batched) or a window of
`decode_steps` decode tokens for every running sequence, so requests join and leave the batch between steps.
Waiting prompts go in whenever their blocks fit (keeping a small reserve so running sequences can grow), a
few decoded tokens after they arrive (`prefill_delay_steps`), so that prompts arriving close together share a
prefill pass, and never in two prefills in a row while other sequences decode.
When a running sequence needs a block and none is free, the youngest running sequence is preempted: its
blocks are freed and it goes back to the front of the queue with every token it has so far, to be recomputed
by a later prefill. Nothing is dropped; a request whose full length could never fit the pool is refused when it arrives.
"""

from collections import deque
from dataclasses import dataclass, field

from cs336_systems.serving.block_manager import BlockManager, CopyOnWrite
from cs336_systems.serving.sequence import Sequence, Status


@dataclass
class ScheduledBatch:
    """`slots[i]`: where sequence i's new keys/values go (every token for a prefill; one per decode step, up
    to `steps`, for a decode window)."""

    kind: str  # "prefill" or "decode"
    seqs: list[Sequence]
    slots: list[list[int]]
    copies: list[CopyOnWrite] = field(default_factory=list)
    steps: int = 1  # decode steps run back to back before the host looks at the tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 256, max_num_batched_tokens: int = 8192,
                 prefill_delay_steps: int = 0, decode_steps: int = 1):
        if min(max_num_seqs, max_num_batched_tokens, decode_steps) < 1 or prefill_delay_steps < 0:
            raise ValueError("max_num_seqs, max_num_batched_tokens and decode_steps must be >= 1, "
                             "prefill_delay_steps >= 0")
        self.decode_steps = decode_steps
        self.prefill_delay_steps = prefill_delay_steps
        self.decodes_since_prefill = 0
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch | None:
        batch = self._schedule_prefill() if self._prefill_due() else None
        if batch is None and self.running:
            batch = self._schedule_decode()
            self.decodes_since_prefill += batch.steps
        elif batch is not None:
            self.decodes_since_prefill = 0
        return batch

    def _prefill_due(self) -> bool:
        """Prompts go in at once when nothing is decoding; otherwise after `prefill_delay_steps` decoded
        tokens (sooner when a batch's worth waits), so that arrivals close together share one prefill, and
        never twice in a row, so that a burst of prompts cannot stall the decoding streams for long."""
        if not self.waiting:
            return False
        if not self.running:
            return True
        if self.decodes_since_prefill == 0:
            return False  # decoding streams get a step between two prefills, however many prompts wait
        if self.decodes_since_prefill >= self.prefill_delay_steps:
            return True
        return len(self.running) + len(self.waiting) >= self.max_num_seqs or len(self.waiting) >= 8

    def _schedule_prefill(self) -> ScheduledBatch | None:
        admitted: list[Sequence] = []
        longest = 0
        reserve = max(1, self.blocks.allocator.capacity // 100) if self.running else 0
        while self.waiting:
            seq = self.waiting[0]
            running_after = len(self.running) + len(admitted) + 1 + seq.forks_pending
            padded_tokens = (len(admitted) + 1) * max(longest, len(seq.token_ids))
            if admitted and (running_after > self.max_num_seqs or padded_tokens > self.max_num_batched_tokens):
                break
            if not admitted and self.running and running_after > self.max_num_seqs:
                break
            if not self.blocks.can_allocate(len(seq.token_ids), reserve):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq.seq_id, len(seq.token_ids))
            seq.status = Status.RUNNING
            admitted.append(seq)
            longest = max(longest, len(seq.token_ids))
        if not admitted:
            return None
        self.running.extend(admitted)
        slots = [self.blocks.slots(s.seq_id, len(s.token_ids)) for s in admitted]
        return ScheduledBatch("prefill", admitted, slots)

    def _schedule_decode(self) -> ScheduledBatch:
        """Slots for the next `decode_steps` tokens of every running sequence (fewer for one that reaches
        max_tokens sooner), preempting the youngest sequences while blocks run short."""
        seqs, slots, copies = [], [], []
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            generated = len(seq.token_ids) - seq.prompt_len
            steps = max(1, min(self.decode_steps, seq.request.params.max_tokens - generated))
            seq_slots = self.blocks.slots_in_place(seq.seq_id, len(seq.token_ids), steps)
            if seq_slots is not None:  # the common case: its own blocks have room for the whole window
                seqs.append(seq)
                slots.append(seq_slots)
                i += 1
                continue
            seq_slots = []
            for step in range(steps):
                holds = len(seq.token_ids) + step  # tokens the pool holds once this step has stored its input
                while self.blocks.needs_new_block(seq.seq_id, holds) and self.blocks.num_free == 0:
                    self.preempt(self.running[-1])
                    if seq.status is not Status.RUNNING:
                        break
                if seq.status is not Status.RUNNING:
                    break
                slot, copy = self.blocks.append_slot(seq.seq_id, holds)
                seq_slots.append(slot)
                if copy is not None:
                    copies.append(copy)
            if seq.status is not Status.RUNNING:
                break  # it was the youngest, now preempted: everyone older is scheduled
            seqs.append(seq)
            slots.append(seq_slots)
            i += 1
        return ScheduledBatch("decode", seqs, slots, copies, steps=self.decode_steps)

    def schedule_ahead(self) -> ScheduledBatch | None:
        """Asynchronous scheduling: the decode window after the one in flight, planned before the host has its
        tokens (each running sequence is `num_inflight` tokens further on than its `token_ids`). A sequence
        whose in-flight window reaches max_tokens is left out (it ends there); one that stops there on a stop
        token or string is not known yet, so it runs this window too and the engine discards its tokens.
        None, and the host takes the in-flight window's results first, whenever that could change the plan:
        a prefill is due, or the window needs more blocks than are free (preemption is decided only by
        `schedule`, on the host's full knowledge), or no running sequence has tokens left to make."""
        if not self.running or self._prefill_due():
            return None
        plan = []
        needed = 0
        for seq in self.running:
            holds = len(seq.token_ids) + seq.num_inflight
            left = seq.request.params.max_tokens - (holds - seq.prompt_len)
            if left <= 0:
                continue
            steps = min(self.decode_steps, left)
            plan.append((seq, holds, steps))
            needed += self.blocks.blocks_needed(seq.seq_id, holds, steps)
        if not plan or needed > self.blocks.num_free:
            return None
        seqs, slots, copies = [], [], []
        for seq, holds, steps in plan:
            seq_slots = self.blocks.slots_in_place(seq.seq_id, holds, steps)
            if seq_slots is None:
                seq_slots = []
                for step in range(steps):
                    slot, copy = self.blocks.append_slot(seq.seq_id, holds + step)
                    seq_slots.append(slot)
                    if copy is not None:
                        copies.append(copy)
            seqs.append(seq)
            slots.append(seq_slots)
        self.decodes_since_prefill += self.decode_steps
        return ScheduledBatch("decode", seqs, slots, copies, steps=self.decode_steps)

    def schedule_prefill_behind(self) -> ScheduledBatch | None:
        """Asynchronous scheduling with a decode window in flight and a prefill due (`schedule_ahead` gave
        None for it): the prompts `schedule` would admit now, so that their pass can be queued on the device
        behind that window instead of after the host has read it. Admission needs free blocks and seats only;
        the window in flight holds its slots already (they were allocated when it was planned), and sequences
        it ends free theirs when it is read, so at worst fewer prompts go in than after the read. Never a
        decode: preemption is decided only by `schedule`."""
        if not self._prefill_due():
            return None
        batch = self._schedule_prefill()
        if batch is not None:
            self.decodes_since_prefill = 0
        return batch

    def preempt(self, seq: Sequence) -> None:
        """Frees the sequence's blocks; it is recomputed from all its tokens when readmitted."""
        self.running.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.num_cached = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def fork(self, parent: Sequence, child: Sequence) -> None:
        self.blocks.fork(parent.seq_id, child.seq_id)
        child.num_cached = parent.num_cached
        child.status = Status.RUNNING
        self.running.append(child)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Ends a sequence (done, or its client went away) and frees its blocks at once."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING and seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.seq_id)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
