"""The decode loop a transformed model runs for greedy and multinomial `generate`: HF's steps and tokens, without a
host-device synchronisation per step.

HF's `_sample` reads `unfinished_sequences.max() == 0` after every step (and copies each token to the host for a
streamer), which blocks the host until the device has finished the step. The host then spends the next step's
Python (input preparation, the compiled step's guards and CUDA-graph replay, logits processing) while the device
idles: 1.8-2.9 ms per step on an H200 at 7B shapes, as much as the step itself once eviction has shrunk the cache.
Here both copies are asynchronous and read one step late, so the host queues step n+1 while the device runs step
n. The price, as for transformers' own `DeferredStopCheck` (which it enables on MPS only): when every sequence has
hit an end-of-sequence token, the loop learns it one step late and has already run one more step, whose token is
dropped. That step fed the last returned token into the cache, so an `HAECache` then holds every token of the
returned sequences (its `seen` counts them), where HF's loop leaves the last one for the next forward. A length
limit is known on the host and never costs an extra step.

Only the common cases take this loop (`fast_loop_applies`): greedy or multinomial decoding, stopping on length
and end-of-sequence tokens, no per-step outputs. Everything else runs HF's own `_sample`.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from hae_fx.batch_buckets import PaddingRowsDone

#: stopping criteria the loop evaluates itself: a length limit (known on the host), end-of-sequence tokens, and the
#: rows of padding of a batch bucket (finished from the start)
SUPPORTED_CRITERIA = (MaxLengthCriteria, EosTokenCriteria, PaddingRowsDone)


def fast_loop_applies(generation_config: Any, stopping_criteria: Any, synced_gpus: bool) -> bool:
    """Whether `hae_sample` reproduces HF's `_sample` for this request (otherwise HF's loop runs)."""
    per_step_outputs = generation_config.return_dict_in_generate and any(
        getattr(generation_config, name, False)
        for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"))
    return (not synced_gpus and not per_step_outputs and not generation_config.is_assistant
            and all(type(criterion) in SUPPORTED_CRITERIA for criterion in stopping_criteria))


def hae_sample(model: Any, input_ids: torch.Tensor, logits_processor: Any, stopping_criteria: Any,
               generation_config: Any, synced_gpus: bool = False, streamer: Any = None, **model_kwargs: Any) -> Any:
    """`GenerationMixin._sample` for the cases `fast_loop_applies` admits, with the stop flag and streamed tokens
    read one step late. Passed to HF's `generate` as `custom_generate`, so HF prepares everything as usual."""
    if not fast_loop_applies(generation_config, stopping_criteria, synced_gpus):
        return type(model)._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
    max_length = min((c.max_length for c in stopping_criteria if isinstance(c, MaxLengthCriteria)), default=None)
    eos = [c.eos_token_id for c in stopping_criteria if isinstance(c, EosTokenCriteria)]
    eos_ids = torch.cat([ids.to(input_ids.device).view(-1) for ids in eos]) if eos else None
    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    for criterion in stopping_criteria:
        if isinstance(criterion, PaddingRowsDone):
            unfinished[criterion.batch:] = 0
    late = _LateReader(input_ids, streamer)

    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    stop_reported = False
    with model._optimize_model_for_decode():
        while True:
            model_kwargs = model._update_model_kwargs_for_generation(outputs, model_kwargs)
            logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
            del outputs
            scores = logits_processor(input_ids, logits)
            if generation_config.do_sample:
                next_tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
            else:
                next_tokens = torch.argmax(scores, dim=-1)
            if eos_ids is not None:
                next_tokens = next_tokens * unfinished + pad_token_id * (1 - unfinished)
            input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
            if eos_ids is not None:
                unfinished = unfinished & ~torch.isin(next_tokens, eos_ids)
            stop_reported = late.push(next_tokens, unfinished if eos_ids is not None else None)
            if stop_reported or (max_length is not None and input_ids.shape[1] >= max_length):
                break
            model_inputs = model.prepare_inputs_for_generation(input_ids, next_sequence_length=1, **model_kwargs)
            outputs = model(**model_inputs, return_dict=True)
    if late.finish(dropped_last=stop_reported):
        input_ids = input_ids[:, :-1]
    if streamer is not None:
        streamer.end()
    if generation_config.return_dict_in_generate:
        from transformers.generation.utils import GenerateDecoderOnlyOutput

        return GenerateDecoderOnlyOutput(sequences=input_ids, past_key_values=model_kwargs.get("past_key_values"))
    return input_ids


class _LateReader:
    """Copies each step's stop flag (and tokens, for a streamer) to the host without waiting, and reads a step's
    copies only when the next step has been queued: by then the device has usually finished them."""

    def __init__(self, input_ids: torch.Tensor, streamer: Any) -> None:
        self.streamer = streamer
        device = input_ids.device
        pinned = device.type == "cuda"
        batch = input_ids.shape[0]
        self.pending: deque[tuple[torch.Tensor, torch.Tensor, _Event]] = deque()
        self.free = deque((torch.zeros((), dtype=torch.bool, pin_memory=pinned),
                           torch.zeros(batch, dtype=torch.long, pin_memory=pinned),
                           _Event() if device.type == "cpu" else torch.Event(device=device, blocking=True))
                          for _ in range(2))

    def push(self, tokens: torch.Tensor, unfinished: torch.Tensor | None) -> bool:
        """Queue this step's copies; return whether the previous step had finished every sequence."""
        stop, tokens_host, done = self.free.popleft()
        stop.fill_(False)
        if unfinished is not None:
            stop.copy_(unfinished.max() == 0, non_blocking=True)
        if self.streamer is not None:
            tokens_host.copy_(tokens, non_blocking=True)
        done.record()
        self.pending.append((stop, tokens_host, done))
        if len(self.pending) < 2:
            return False
        previous = self.pending.popleft()
        self.free.append(previous)
        return self._read(previous)

    def _read(self, step: tuple[torch.Tensor, torch.Tensor, _Event]) -> bool:
        stop, tokens_host, done = step
        done.synchronize()
        if self.streamer is not None:
            self.streamer.put(tokens_host.clone())
        return bool(stop)

    def finish(self, dropped_last: bool) -> bool:
        """Flush the last step: streamed unless it ran past a stop already reported. Returns whether the caller
        must drop the last token, which happens when that step's predecessor had finished every sequence."""
        last = self.pending.popleft()
        if dropped_last:
            last[2].synchronize()
            return True
        self._read(last)
        return False


class _Event:
    """What the loop needs of a `torch.Event` on the CPU, where copies complete before they return."""

    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass
